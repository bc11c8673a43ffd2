"""Print the commands of README.md's "Two commands" block, one per line, exactly as a user would copy them."""
import re
import sys
from pathlib import Path

text = Path(sys.argv[1]).read_text()
section = text.split("## Two commands", 1)[1]
block = re.search(r"```bash\n(.*?)```", section, re.S)
if block is None:
    sys.exit("README.md: no ```bash block under '## Two commands'")
commands = [line for line in block.group(1).splitlines() if line.strip()]
if len(commands) != 2:
    sys.exit(f"README.md: expected 2 commands under '## Two commands', found {len(commands)}")
print("\n".join(commands))
