"""Stage two's step as a CUDA graph: each epoch's full steps replay one captured step (``StepGraph``), and train what
the eager steps train. Run by the GPU check with the other CUDA tests (``python -m pytest -m cuda tests/``);
``EPICFEAT_TEST_CUDA_DEVICE=cpu`` rehearses them on the CPU, where the same static-input step runs without a capture."""
import pytest
import torch
from test_cuda import CUDA, DEVICE, pytestmark  # noqa: F401 - the CUDA tests' device and marks (skip without a GPU)
from test_train_temporal import DIM, N_NOUNS, N_VERBS, _planted_split

import epicfeat.temporal.train as train_module
from epicfeat.devices import PRECISION_DTYPES
from epicfeat.temporal.model import TemporalModelArgs, create_temporal_model
from epicfeat.temporal.train import StepSettings, train_one_epoch
from epicfeat.training import EarlyStopping, LRSchedule, TrainingState



def _epochs(graphs: bool, precision: str, epochs: int = 2):
    """Train a small BiLSTM for ``epochs`` on DEVICE: (the epochs' mean losses, its weights, the lr tensor or number
    the optimiser holds, the StepGraphs built)."""
    split = _planted_split(70, seed=4).to(DEVICE)  # 70 / 16: 4 full steps and a partial one per epoch
    torch.manual_seed(0)
    model = create_temporal_model(TemporalModelArgs(input_dim=DIM, hidden=16, lstm_dropout=0.0, dropout=0.0,
                                                    n_verbs=N_VERBS, n_nouns=N_NOUNS)).to(DEVICE)
    model.compute_dtype = PRECISION_DTYPES[precision]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    state = TrainingState(optimizer, LRSchedule(peak=1e-2, warmup_steps=3, total_steps=5 * epochs),
                          EarlyStopping(patience=0, validated=False),
                          torch.Generator(device=DEVICE).manual_seed(0))
    settings = StepSettings(frames=6, batch_size=16, micro_batch_size=8, label_smoothing=0.1, cutmix_alpha=1.0,
                            graphs=graphs)
    built = []
    graph_class = train_module.StepGraph

    def recorded(*args, **kwargs):
        built.append(graph_class(*args, **kwargs))
        return built[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "StepGraph", recorded)
        losses = [train_one_epoch(model, split, state, settings)["train_loss"] for _ in range(epochs)]
    assert state.step == 5 * epochs
    return losses, {k: v.detach().cpu() for k, v in model.state_dict().items()}, optimizer.param_groups[0]["lr"], built


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_steps_train_what_eager_steps_train(precision):
    eager_losses, eager_weights, _, none = _epochs(graphs=False, precision=precision)
    losses, weights, lr, graphs = _epochs(graphs=True, precision=precision)
    assert not none and len(graphs) == 2  # one capture per epoch: steps 3 and 4 (steps 1, 2: warm-up; 5: partial)
    assert all((g.graph is not None) == CUDA for g in graphs)  # a real capture on a GPU
    if CUDA:
        # The captured optimiser reads the lr from device memory, filled in place by set_lr: the last step's lr.
        assert isinstance(lr, torch.Tensor) and lr.device.type == "cuda"
        assert lr.item() == pytest.approx(LRSchedule(peak=1e-2, warmup_steps=3, total_steps=10)(9))
    # The same kernels in the same order: equal on the CPU, equal to float rounding on a GPU.
    tolerance = dict(rtol=0, atol=0) if not CUDA else dict(rtol=1e-4, atol=1e-5)
    assert eager_losses == pytest.approx(losses, rel=tolerance["rtol"], abs=tolerance["atol"])
    for name in eager_weights:
        torch.testing.assert_close(weights[name], eager_weights[name], **tolerance)
