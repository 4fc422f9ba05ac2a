"""Precision choice (bf16 autocast on native-bf16 CPUs and GPUs, fp16 on older GPUs, fp32 otherwise) and fp32 checkpoints from bf16 training."""

import pytest
import torch

from carvana.training import precision as P
from carvana.training.callbacks import Callback
from carvana.training.checkpoint import ModelSaverCallback, load_checkpoint
from carvana.training.classifier import CarvanaClassifier
from carvana.models.unet1024 import UNet1024
from conftest import synthetic_batches

CPU = torch.device("cpu")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile amx_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert P.cpu_bf16_flags(info) == ["amx_bf16", "avx512_bf16"]
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert P.cpu_bf16_flags(info) == []


def test_bf16_only_where_the_cpu_has_it_and_never_with_no_amp(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_flags", lambda: ["amx_bf16"])
    native = P.choose_precision(CPU, amp=True)
    assert (native.dtype, native.name) == (torch.bfloat16, "bf16") and "amx_bf16" in native.describe()
    assert P.choose_precision(CPU, amp=False) == P.Precision(None, "fp32", "--no-amp")
    monkeypatch.setattr(P, "cpu_bf16_flags", lambda: [])
    emulated = P.choose_precision(CPU, amp=True)
    assert (emulated.dtype, emulated.name) == (None, "fp32") and "without native bf16" in emulated.reason
    # On the CPU channels_last for inference only (measured faster there, slower for training),
    # unless --no-channels-last.
    assert P.use_channels_last(CPU, True, inference=True) and not P.use_channels_last(CPU, False, inference=True)
    assert not P.use_channels_last(CPU, True)


def make(monkeypatch, amp, native=True, epochs=2):
    monkeypatch.setattr(P, "cpu_bf16_flags", lambda: ["amx_bf16"] if native else [])
    torch.manual_seed(0)
    return CarvanaClassifier(UNet1024(width=0.125), epochs=epochs, lr=3e-3, device="cpu", amp=amp, progress=False)


class LossSpy:
    """Wraps the loss: records the dtypes it is given and returns."""

    def __init__(self, loss_fn):
        self.loss_fn, self.seen = loss_fn, []

    def __call__(self, logits, target):
        loss = self.loss_fn(logits, target)
        self.seen.append((logits.dtype, loss.dtype))
        return loss


def test_bf16_training_computes_the_loss_in_fp32_and_saves_fp32_weights_that_predict_in_fp32(monkeypatch, tmp_path):
    train, valid = synthetic_batches(3, seed=1), synthetic_batches(1, seed=2)
    clf = make(monkeypatch, amp=True)
    assert clf.amp_dtype == torch.bfloat16 and not clf.channels_last  # CPU training: NCHW
    assert clf.inference.memory_format == torch.channels_last and clf.inference.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=clf.amp_dtype):  # the model does run in bf16 under it
        assert clf.model(train[0]["image"]).dtype == torch.bfloat16
    spy = clf.loss_fn = LossSpy(clf.loss_fn)
    history = clf.train(train, valid, callbacks=[ModelSaverCallback(tmp_path, {})])
    assert history[-1]["train_loss"] < history[0]["train_loss"] and 0 < history[-1]["valid_dice"] <= 1
    assert spy.seen and set(spy.seen) == {(torch.float32, torch.float32)}
    # Checkpoint: every floating tensor (weights, BN stats, Adam moments) is fp32.
    state = load_checkpoint(tmp_path / "last.pt")
    tensors = list(state["model"].values()) + [v for s in state["optimizer"]["state"].values() for v in s.values()]
    floats = [t for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)
    # Predict on an fp32 machine (no native bf16) from those weights: fp32 probabilities,
    # and the same masks as the bf16 run's up to rounding near the threshold.
    fp32 = make(monkeypatch, amp=True, native=False)
    assert fp32.amp_dtype is None and fp32.precision.name == "fp32"
    fp32.load_state_dict(state, weights_only=True)
    probs = {}
    for name, c in (("bf16", clf), ("fp32", fp32)):
        c.load_state_dict(state, weights_only=True)
        out = []
        c.predict(valid, [Collect(out)])
        probs[name] = torch.cat(out)
    assert probs["fp32"].dtype == torch.float32 == probs["bf16"].dtype
    assert (probs["fp32"] - probs["bf16"]).abs().mean() < 0.01
    assert ((probs["fp32"] > 0.5) == (probs["bf16"] > 0.5)).float().mean() > 0.99


class Collect(Callback):
    def __init__(self, out):
        self.out = out

    def on_predict_batch_end(self, trainer, names, probs):
        self.out.append(probs.detach().cpu())


@pytest.mark.parametrize("capability, expected", [
    ((8, 0), torch.bfloat16),  # A100
    ((9, 0), torch.bfloat16),  # H100
    ((8, 9), torch.bfloat16),  # L4
    ((7, 5), torch.float16),   # T4: torch reports bf16 "supported" through emulation
    ((6, 0), torch.float16),   # P100
    ((7, 0), torch.float16),   # V100
])
def test_cuda_bf16_only_where_native_else_fp16_with_a_scaler(monkeypatch, capability, expected):
    # No GPU needed: the capability queries are faked. is_bf16_supported says True everywhere,
    # as torch's default (including_emulation=True) does on a T4 or P100.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.version, "hip", None)
    cuda = torch.device("cuda", 0)
    chosen = P.choose_precision(cuda, amp=True)
    assert chosen.dtype == expected and chosen.name == {torch.bfloat16: "bf16", torch.float16: "fp16"}[expected]
    assert f"sm_{capability[0]}{capability[1]}" in chosen.reason
    # The classifier's GradScaler is enabled exactly for fp16 (bf16 has fp32's exponent range).
    assert (chosen.dtype == torch.float16) == ("gradient scaler" in chosen.reason)
    assert P.choose_precision(cuda, amp=False).dtype is None
    assert P.use_channels_last(cuda, True)
