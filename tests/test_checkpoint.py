"""save_checkpoint's per-epoch cost: last.pt (resume state) is written without zip CRC-32s, best.pt with them;
both load back bit for bit, and torch's global save setting is left as it was."""
import zipfile

import pytest
import torch

from epicfeat.temporal.checkpoint import ModelCard, load_checkpoint, save_checkpoint
from epicfeat.temporal.model import TemporalModelArgs, create_temporal_model

serialization_config = pytest.importorskip("torch.utils.serialization.config")  # torch >= 2.6


def _save(path, model, optimizer=None):
    state = None if optimizer is None else {"optimizer": optimizer.state_dict(), "scheduler": {"step": 7}}
    card = ModelCard(config={"frames": 4}, verb_classes=("v0", "v1", "v2"), noun_classes=("n0", "n1"),
                     feature_set={"weights": "random"}, feature_set_key="set")
    return save_checkpoint(path, model=model, card=card, epoch=2, metrics={"all_action_accuracy_at_1": 50.0},
                           history=[{"epoch": 1}, {"epoch": 2}], training_state=state)


def test_last_pt_skips_crc32_best_pt_keeps_it_and_both_load_exactly(tmp_path):
    torch.manual_seed(0)
    model = create_temporal_model(TemporalModelArgs(input_dim=6, hidden=8, n_verbs=3, n_nouns=2),
                                  torch.zeros(6), torch.ones(6))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    verbs, nouns = model(torch.randn(2, 4, 6))
    (verbs.sum() + nouns.sum()).backward()
    optimizer.step()

    best, last = _save(tmp_path / "best.pt", model), _save(tmp_path / "last.pt", model, optimizer)
    with zipfile.ZipFile(best) as archive:
        assert archive.testzip() is None  # every entry's CRC-32 is there and right: zip tools accept best.pt
        assert all(entry.CRC != 0 for entry in archive.infolist() if entry.file_size > 0)
    with zipfile.ZipFile(last) as archive:
        assert {entry.CRC for entry in archive.infolist()} == {0}  # not computed
    assert serialization_config.save.compute_crc32 is True  # the global setting came back

    resumed = load_checkpoint(last)
    assert resumed.training_state["scheduler"] == {"step": 7}
    saved_moments = optimizer.state_dict()["state"]
    for index, moments in resumed.training_state["optimizer"]["state"].items():
        assert all(torch.equal(moments[key], saved_moments[index][key]) for key in ("exp_avg", "exp_avg_sq"))
    for checkpoint in (resumed, load_checkpoint(best)):
        assert all(torch.equal(checkpoint.model_state[name], tensor) for name, tensor in model.state_dict().items())
    assert load_checkpoint(best).training_state is None
