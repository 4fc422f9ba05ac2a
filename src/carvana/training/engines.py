"""Inference engines for CPU prediction: ``--engine auto|torch|openvino|onnxruntime``.

PyTorch eager runs the network operator by operator. An inference engine compiles the whole
prediction step into one graph and fuses it, choosing kernels for this CPU. The graph is
training/prediction_graph.py's (uint8 in, probabilities out, the flip TTA inside). Cropping a
native-size map and zeroing unreadable images stay outside, shared with the torch path.

* ``openvino``: the graph compiled by OpenVINO for this CPU, with its throughput hint and one
  inference stream per evaluation stream; bf16 where the CPU has it and ``--amp`` is on
  (OpenVINO chooses), else fp32.
* ``onnxruntime``: the same ONNX graph on ONNX Runtime's CPU provider (fp32).
* ``torch``: the eager path (``training/inference.py``); always the engine on CUDA.
* ``auto``: see :func:`choose_engine` (the rule and its figures: bench/README.md).
* ``--int8``: OpenVINO runs the graph NNCF quantized (training/quantize.py), its own cache key.

Compile once: the ONNX graph and OpenVINO's compiled blob are kept under
``output/engines/<key>/``, keyed on the weights' content, the model config, TTA, the engine
and its version, the precision asked for and the CPU's flags. A changed key builds anew; a
cache that does not load is removed and rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from carvana.data.files import write_json_atomic
from carvana.models.registry import ModelConfig, arch_spec
from carvana.training.precision import cpuinfo_flags
from carvana.training.prediction_graph import LAYOUT, OPSET, ProbabilityGraph, export_graph

ENGINES = ("auto", "torch", "openvino", "onnxruntime")
CACHE_DIR = Path(os.environ.get("CARVANA_ENGINE_CACHE", "output/engines"))
# The prediction graph's layout, in the cache key (training/prediction_graph.py): bench/engine.py sets it
# to 1, the earlier graph, for its A/B; every graph compiled here is built with this layout.
GRAPH = LAYOUT


class EngineError(ValueError):
    """An engine asked for by name that cannot run here, in one line."""


def engine_version(name: str) -> str:
    """The installed version of an engine's runtime ('' when it is not installed)."""
    try:
        if name == "openvino":
            import openvino

            return str(openvino.__version__)
        if name == "onnxruntime":
            import onnxruntime

            return str(onnxruntime.__version__)
    except ImportError:
        return ""
    return torch.__version__


def choose_engine(name: str, device: torch.device) -> str:
    """The engine ``--engine`` means here. CUDA keeps torch. ``auto`` on a CPU is OpenVINO
    where it is installed (the fastest measured: bench/engine.py, bench/README.md), else torch.
    An engine named explicitly that is not installed is an EngineError."""
    if name not in ENGINES:
        raise EngineError(f"--engine {name!r}: expected one of {', '.join(ENGINES)}")
    if device.type != "cpu":
        if name in ("openvino", "onnxruntime"):
            raise EngineError(f"--engine {name}: runs on the CPU only; this run predicts on {device} (use --engine "
                              "torch or auto)")
        return "torch"
    if name == "auto":
        return "openvino" if engine_version("openvino") else "torch"
    if name != "torch" and not engine_version(name):
        raise EngineError(f"--engine {name}: the package is not installed (pip install -r requirements.txt)")
    return name


def cpu_flags() -> str:
    """The CPU's instruction-set flags (a compiled model is only valid for the CPU it was built for)."""
    flags = cpuinfo_flags()
    if flags:
        return " ".join(sorted(flags))
    import platform

    return platform.processor() or platform.machine()


def cache_key(digest: str, config: ModelConfig, tta: bool, engine: str, precision: str, pad: bool = True) -> str:
    """The compiled model's identity: anything that changes what it computes or where it runs."""
    parts = {"weights": digest, "config": config.to_dict(), "tta": bool(tta), "pad": bool(pad), "engine": engine,
             "version": engine_version(engine), "precision": precision, "cpu": cpu_flags(), "opset": OPSET,
             "graph": GRAPH}
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):  # kernels capped below the CPU's flags (bench/isa.py): another build
        parts["isa_cap"] = os.environ["ONEDNN_MAX_CPU_ISA"]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


class CompiledEngine:
    """One compiled prediction graph: ``probabilities(uint8 batch) -> (N, classes, h, w)``,
    callable from several threads at once (one inference request per thread)."""

    def __init__(self, name: str, run: Any, precision: str, folder: Path, seconds: float, runtime: Any = None) -> None:
        self.name, self._run, self.precision, self.folder, self.compile_seconds = name, run, precision, folder, seconds
        self.runtime = runtime  # OpenVINO's CompiledModel or ONNX Runtime's session, for inspection (benches)

    def describe(self) -> str:
        return f"{self.name} ({self.precision})"

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._run(np.ascontiguousarray(images.numpy())))


def engine_threads() -> int:
    """The threads an engine may use: OMP_NUM_THREADS where set (torchrun sets 1 per rank), else
    this process's cores. Not torch.get_num_threads(): a graph compiled lazily inside an
    evaluation stream would see that stream's single torch thread."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _openvino(onnx: Path, folder: Path, amp: bool, streams: int) -> tuple[Any, str, Any]:
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": str(max(1, streams)),
              "INFERENCE_NUM_THREADS": str(engine_threads()), "CACHE_DIR": str(folder / "openvino")}
    if not amp:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(str(onnx), "CPU", config)
    local = threading.local()

    def run(x: np.ndarray) -> np.ndarray:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        return np.array(request.infer({0: x})[0], copy=True)

    return run, str(compiled.get_property("INFERENCE_PRECISION_HINT")).replace("<Type: '", "").replace("'>", ""), compiled


def _onnxruntime(onnx: Path, streams: int) -> tuple[Any, str, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, engine_threads() // max(1, streams))
    session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
    return (lambda x: session.run(None, {"image": x})[0]), "f32", session


def precision_tag(amp: bool, int8: Any = None) -> str:
    """The precision asked of an engine, as its cache key and the fingerprint name it: 'auto'
    (bf16 where the CPU has it) or 'f32', plus the int8 graph's identity under --int8."""
    return ("auto" if amp else "f32") + (f":{int8.identity}" if int8 is not None else "")


def compile_engine(name: str, model: nn.Module, config: ModelConfig, digest: str, tta: bool, amp: bool,
                   streams: int, cache_dir: Path | None = None, pad: bool = True, int8: Any = None) -> CompiledEngine:
    """The prediction graph of ``model`` compiled by engine ``name`` (openvino | onnxruntime),
    from the on-disk cache when its key matches; a cache that fails to load is rebuilt once.
    ``pad``: the graph mirrors the margin of a valid-convolution net itself (False: the input has it).
    ``int8``: an ``Int8Spec`` (training/quantize.py): OpenVINO runs the graph NNCF quantized."""
    import time

    start = time.perf_counter()
    folder = Path(cache_dir or CACHE_DIR) / cache_key(digest, config, tta, name, precision_tag(amp, int8), pad)
    margin = arch_spec(config.arch).output_margin if pad else 0
    input_hw = tuple(config.input_size[i] - 2 * margin for i in (0, 1))
    for attempt in (0, 1):
        onnx = folder / "model.onnx"
        try:
            if not (folder / "key.json").is_file():
                graph = ProbabilityGraph(model, config, tta, pad, layout=GRAPH).eval()
                export_graph(graph, input_hw, onnx)
                write_json_atomic(folder / "key.json", {"engine": name, "tta": tta, "config": config.to_dict()})
            graph_file = int8.quantized(onnx, folder, input_hw) if int8 is not None else onnx
            run, precision, runtime = (_openvino(graph_file, folder, amp, streams) if name == "openvino"
                                       else _onnxruntime(onnx, streams))
            run(np.zeros((1, 3, *input_hw), dtype=np.uint8))  # a compiled model that cannot run is no cache
            precision = f"int8, {precision} elsewhere" if int8 is not None else precision
            return CompiledEngine(name, run, precision, folder, time.perf_counter() - start, runtime)
        except Exception:
            if attempt:
                raise
            shutil.rmtree(folder, ignore_errors=True)  # a corrupt or foreign cache: built anew, once
    raise AssertionError("unreachable")


class EngineSlot:
    """A classifier's engine for fixed-weights prediction: compiled on first use for each TTA
    setting (one compile at a time, under a lock), then shared by every evaluation stream.
    With ``--engine auto`` a failed compile falls back to torch, said in one line; an engine
    asked for by name fails in one line instead."""

    def __init__(self, name: str, asked: str, model: nn.Module, config: ModelConfig, digest: str, amp: bool,
                 streams: int, cache_dir: Path | None = None, pad: bool = True, int8: Any = None) -> None:
        self.name, self.asked, self.model, self.config, self.digest = name, asked, model, config, digest
        self.amp, self.streams, self.cache_dir, self.pad, self.int8 = amp, streams, cache_dir, pad, int8
        self._compiled: dict[bool, CompiledEngine | None] = {}
        self._lock = threading.Lock()

    @property
    def identity(self) -> str:
        """What the submission fingerprint records: the engine and the precision asked of it."""
        return f"{self.name}:{precision_tag(self.amp, self.int8)}"

    def compiled(self, tta: bool) -> CompiledEngine | None:
        """The compiled graph for ``tta``, or None where auto fell back to torch."""
        with self._lock:
            if tta not in self._compiled:
                self._compiled[tta] = self._compile(tta)
            return self._compiled[tta]

    def _compile(self, tta: bool) -> CompiledEngine | None:
        from carvana.training import distributed as dist

        try:
            engine = compile_engine(self.name, self.model, self.config, self.digest, tta, self.amp, self.streams,
                                    self.cache_dir, self.pad, self.int8)
        except Exception as exc:  # noqa: BLE001  an engine that cannot compile this graph on this CPU
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            if self.int8 is not None:  # int8 was asked for: never a silent fall back to float torch
                raise EngineError(f"--int8: cannot quantize or compile the prediction graph ({reason}); predict "
                                  "without --int8") from None
            if self.asked != "auto":
                raise EngineError(f"--engine {self.asked}: cannot compile the prediction graph ({reason}); "
                                  "--engine torch predicts without it") from None
            if dist.is_main_process():
                print(f"engine: {self.name} could not compile the prediction graph ({reason}); predicting with torch")
            return None
        if dist.is_main_process():
            print(f"engine: {engine.describe()}, compiled in {engine.compile_seconds:.1f} s (cache {engine.folder})")
        return engine


def attach_engine(classifier: Any, asked: str, digest: str, cache_dir: Path | None = None, int8: Any = None) -> str:
    """Give ``classifier`` the engine ``--engine asked`` means here (its prediction paths then
    run the compiled graph); returns the engine's name ('torch': nothing attached). ``int8``:
    an ``Int8Spec`` (--int8, training/quantize.py), OpenVINO only."""
    name = choose_engine(asked, classifier.device)
    if int8 is not None and name != "openvino":
        raise EngineError(f"--int8: quantizes the OpenVINO graph; --engine {asked} means {name} here")
    classifier.engine = None if name == "torch" else EngineSlot(
        name, asked, classifier.model, classifier.model_config, digest, classifier.amp_dtype is not None,
        classifier.streams, cache_dir, int8=int8)
    return name
