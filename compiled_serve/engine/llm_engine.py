"""LLMEngine: requests in, one scheduler step at a time, outputs back.

Not thread-safe: one thread owns it (the offline `LLM` loop, or the server's engine thread).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from compiled_serve.build import BuildStatus
from compiled_serve.build.model_snapshot import load_model_cached
from compiled_serve.build.tp_builds import open_rank_build
from compiled_serve.cache import BuildKey
from compiled_serve.cache.build_cache import BuildCache
from compiled_serve.config import EngineConfig
from compiled_serve.detokenizer import IncrementalDetokenizer
from compiled_serve.engine.block_manager import BlockManager
from compiled_serve.engine.buckets import default_mixed_buckets, resolve_decode_buckets
from compiled_serve.engine.cuda_graphs import capture_cost_estimate, measure_capture_bytes
from compiled_serve.engine.device import resolve_device, resolve_dtype, resolve_kv_cache_dtype
from compiled_serve.engine.kv_cache import (
    allocate_kv_cache,
    kv_bytes_per_block,
    num_blocks_for_cpu,
    num_blocks_for_cuda,
)
from compiled_serve.engine.model_runner import GuardsOffAfterWarmup, ModelRunner
from compiled_serve.engine.output_builder import build_request_output
from compiled_serve.engine.persistent_batch import PersistentBatch
from compiled_serve.engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from compiled_serve.engine.sequence import Sequence, SequenceStatus
from compiled_serve.engine.stats import EngineStats
from compiled_serve.engine.step_runner import InFlightStep, StepRunner
from compiled_serve.engine.step_sampler import TailInputs, TailRow, raw_logprobs, wrap_int64
from compiled_serve.engine.structured_state import StructuredState
from compiled_serve.engine.tp_engine import TensorParallelDriver
from compiled_serve.errors import InvalidParameterError
from compiled_serve.models.quantization import (
    QUANTIZED_LINEAR_PASS,
    load_quantized_model,
    resolve_quantization,
)
from compiled_serve.outputs import RequestOutput
from compiled_serve.passes.logits_tail_pipeline import (
    EnginePasses,
    compile_logits_tail,
    logits_tail_pass_manager,
)
from compiled_serve.passes.pipeline import compile_model
from compiled_serve.passes.registry import default_pass_manager
from compiled_serve.phase_progress import report_progress
from compiled_serve.sampling_params import SamplingParams
from compiled_serve.structured import StructuredOutputsParams

logger = logging.getLogger("compiled_serve.engine")

OUTPUT_KINDS = ("cumulative", "delta", "final")
WARMUP_PHASE = "warm-up steps"  # its progress: one step per shape the warm-up runs
WARMUP_SHAPES = 6  # the full warm-up's (see _run_warmup_requests); a warm start's short check runs 2

# Seeds of unseeded requests: drawn once per sequence, independent of any torch generator state.
_SEED_SOURCE = random.SystemRandom()


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    output_kind: str = "cumulative"


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, on_progress: Callable[[str], None] | None = None,
                 build_cache: BuildCache | None = None):
        """`build_cache`: where a loaded GGUF model and the build are looked up and kept
        (compiled_serve.startup passes one unless the config turns it off)."""
        self.config = config = config or EngineConfig()
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.kv_dtype = resolve_kv_cache_dtype(config, self.device, self.dtype)
        # Tensor parallel: this process is rank 0; the workers start (and load) meanwhile.
        # (At TP=1 only with distributed_executor_backend="mp": the worker path with no worker.)
        use_driver = config.tensor_parallel_size > 1 or config.distributed_executor_backend == "mp"
        self.tp = TensorParallelDriver(config, self.device) if use_driver else None
        try:
            self._start(config, on_progress, build_cache)
        except BaseException:
            if self.tp is not None:  # no process (nor this process's group) outlives a failed start
                self.tp.shutdown()
            raise

    def _start(self, config: EngineConfig, on_progress: Callable[[str], None] | None,
               build_cache: BuildCache | None) -> None:
        t0 = time.perf_counter()
        # Quantized weights (models/quantization.py) load their own way: the snapshot cache holds float tensors.
        self.quantization = "none" if self.tp and config.quantization in (None, "auto", "none") else \
            resolve_quantization(config.quantization, config.model, config.load_format, self.device)
        if self.tp and self.quantization != "none":
            raise InvalidParameterError("quantization", "not supported with tensor_parallel_size > 1 yet")
        if self.quantization != "none":
            loaded = load_quantized_model(config.model, self.quantization, load_format=config.load_format,
                                          dtype=self.dtype, device=self.device, tokenizer=config.tokenizer,
                                          seed=config.seed)
        else:
            loaded = self.tp.load_model(self.dtype) if self.tp else load_model_cached(config, self.dtype, self.device,
                                                                                       build_cache)
        self.load_seconds = time.perf_counter() - t0
        self.model = loaded.module
        self.model_config = mc = loaded.config
        self.tokenizer = loaded.tokenizer
        self.chat_template = loaded.chat_template
        self.model_source = loaded.source
        self.weight_fingerprint = loaded.weight_fingerprint
        self._on_progress = on_progress or (lambda message: None)

        # Decode buckets (CUDA graphs), the build key, and a persisted build if one was asked for:
        # its artifacts must be in torch's caches before the first compile (compiled_serve.build).
        self.decode_buckets = resolve_decode_buckets(config.cuda_graph_buckets, config.max_num_seqs)
        # Token buckets of prefill/mixed-step graphs (the new step path only).
        self.mixed_buckets = default_mixed_buckets(config.max_num_batched_tokens) \
            if config.scheduling != "legacy" else ()
        self.use_cuda_graphs = self.device.type == "cuda" and not config.enforce_eager
        quantized = [QUANTIZED_LINEAR_PASS] if self.quantization != "none" else []
        self.pass_manager = default_pass_manager(extra=list(config.extra_passes) + quantized,
                                                 disabled=list(config.disabled_passes), device=self.device.type)
        if self.tp:
            self.pass_manager = self.tp.pass_manager(self.pass_manager)
        self.tail_pass_manager = logits_tail_pass_manager()
        self.build_key = BuildKey.for_current_toolchain(
            model_config={**mc.to_dict(), **(self.tp.key() if self.tp else {}),
                          **({"kv_cache_dtype": "fp8_e4m3"} if self.kv_dtype != self.dtype else {})},
            weight_fingerprint=self.weight_fingerprint,
            passes=EnginePasses(self.pass_manager, self.tail_pass_manager).uuids(), buckets=self.decode_buckets,
            dtype=self.dtype, compile_mode=config.compile_mode, device=self.device, quantization=self.quantization)
        self.build_status: BuildStatus | None = open_rank_build(config, self.build_key, build_cache)
        step_fn, self.compile_report = compile_model(self.model, mode=config.compile_mode, passes=self.pass_manager)
        if self.tp:
            step_fn = self.tp.wrap(self.model, step_fn)  # mirrors each step to the workers
        # The tail's rewritten graph is one fused_sample call: nothing for Inductor to generate, so
        # it runs as is in every mode (no compile time, no extra build artifacts).
        self.logits_tail, self.tail_report = compile_logits_tail("graph", self.tail_pass_manager)
        self.compile_seconds = 0.0

        block_size = config.block_size
        kv_heads = self.tp.kv_heads(mc) if self.tp else mc.num_kv_heads  # this rank's
        per_block = kv_bytes_per_block(mc.num_layers, block_size, kv_heads, mc.head_dim, self.kv_dtype)
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        elif self.device.type == "cuda":
            reserve = self._profile_activation_peak()
            if self.use_cuda_graphs:
                # The graph pool is private memory: measure it before the KV cache takes the rest.
                self._on_progress("measuring CUDA-graph memory (compiles the step)")
                t0 = time.perf_counter()
                measure = self.tp.measure_capture_bytes if self.tp else measure_capture_bytes  # every rank's
                reserve += capture_cost_estimate(measure(
                    step_fn, mc.num_layers, block_size, kv_heads, mc.head_dim, self.kv_dtype,
                    max(self.decode_buckets[-1], *self.mixed_buckets), config.max_model_len or mc.max_position_embeddings, self.device,
                ), len(self.decode_buckets) + len(self.mixed_buckets))
                self.compile_seconds += time.perf_counter() - t0
            num_blocks = num_blocks_for_cuda(self.device, config.gpu_memory_utilization, reserve, per_block)
        else:
            num_blocks = num_blocks_for_cpu(config.cpu_kv_cache_gib, per_block)
        self.kv_caches = allocate_kv_cache(mc.num_layers, num_blocks, block_size, kv_heads, mc.head_dim,
                                           self.kv_dtype, self.device)
        if self.tp:
            self.tp.setup(num_blocks)
        # A single sequence must always fit in the pool, or preemption could never make room.
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, num_blocks * block_size)

        t0 = time.perf_counter()
        self.block_manager = BlockManager(num_blocks, block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.mixed_buckets if self.use_cuda_graphs else ())
        self.precompiled = None  # CPU in-process: AOT-compiled step and tail kept in the build
        if self.device.type == "cpu" and self.tp is None:
            from compiled_serve.build.precompiled import engine_precompiled

            self.precompiled, step_fn, self.logits_tail = engine_precompiled(self, step_fn)
        self.runner = ModelRunner(self.model, step_fn, self.kv_caches, block_size, self.device)
        if self.tp is not None:  # graphs capture the bare step; the driver mirrors each set and replay
            self.runner.graph_step_fn, self.runner.on_new_graphs = self.tp.raw_step, self.tp.mirror_graphs
        self.batch = PersistentBatch(config.max_num_seqs, self.max_model_len, block_size)
        self.step_runner = StepRunner(self.runner, self.logits_tail, self.batch)
        self._inflight: InFlightStep | None = None
        self._requests: dict[str, _Request] = {}
        self._eos_ids = set(mc.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self._eos_ids.add(int(self.tokenizer.eos_token_id))
        self.structured = StructuredState(self.tokenizer, mc.vocab_size, self._eos_ids,
                                          config.structured_outputs_backend)
        self._reset_counters()
        self._on_progress("compiling (warm-up steps)")
        self._warmup()
        if isinstance(self.runner.step_fn, GuardsOffAfterWarmup):  # CPU: the warm-up compiled the step
            # In process, the one compiled graph is called directly (model_runner.py); a tensor-
            # parallel step must go through its wrapper, which mirrors it to the workers.
            self.runner.step_fn.arm(self.compile_report.direct_call() if self.tp is None else None)
        if self.use_cuda_graphs:
            # One log line per graph set (cuda_graphs.py); each bucket is a step of its progress bar.
            self._on_progress("capturing CUDA graphs")
            if self.mixed_buckets:
                self.runner.capture_mixed_graphs(self.mixed_buckets, self.max_model_len, config.max_num_seqs)
            self.runner.capture_decode_graphs(self.decode_buckets, self.max_model_len)
        self.compile_seconds += time.perf_counter() - t0
        self._reset_counters()
        if self.tp is not None and self.build_status is not None:  # each worker's own build (tp_builds.py)
            self.build_status.message = "; ".join([f"rank 0: {self.build_status.message}",
                                                   *self.tp.worker_build_messages()])

    # ----------------------------------------------------------------- setup
    def _reset_counters(self) -> None:
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._computed_tokens_total = 0

    @torch.inference_mode()
    def _profile_activation_peak(self) -> int:
        """Peak extra memory of one full-budget step, measured with the dense (unpaged) model."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        n = self.config.max_num_batched_tokens
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        hidden = self.model(ids, torch.arange(n, device=self.device))
        self.model.compute_logits(hidden[: self.config.max_num_seqs])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del hidden
        torch.cuda.empty_cache()
        return int(peak * 1.2)

    def _warmup(self) -> None:
        if self.config.scheduling == "legacy":
            self._legacy_warmup()
        else:
            # A warm start whose build holds every function variant the cold start's full warm-up
            # compiled has nothing left to compile: a short check instead (build/precompiled.py).
            self._run_warmup_requests(full=self.precompiled is None or not self.precompiled.complete)

    def _run_warmup_requests(self, full: bool = True) -> None:
        """Runs what serving will hit through the real step path, before "ready": a full-budget
        prefill, a mixed step (a prefill chunk beside decodes), decode steps, both tail variants
        (row-table and host-built), the logprobs path and grammar-constrained rows. CUDA graphs
        are captured afterwards; each captured graph is replayed once before ready (cuda_graphs.py).

        The requests run on a throwaway block manager and scheduler over the same KV cache, so the
        engine's own pool, prefix cache and counters start untouched.
        """
        real = self.block_manager, self.scheduler
        cfg = self.config
        self.block_manager = BlockManager(real[0].num_blocks, cfg.block_size, enable_prefix_caching=False)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        budget = cfg.max_num_batched_tokens
        on_gpu = self.device.type == "cuda"
        total = WARMUP_SHAPES if full else 2
        shapes = iter(range(1, total + 1))

        def shape_done() -> None:  # a step of the warm-up's progress bar (on a terminal)
            report_progress(WARMUP_PHASE, next(shapes), total)

        try:
            if not full:
                # One prefill and decodes through the loaded step and tail, and the grammar
                # backend's tokenizer built before the first request; no other real steps.
                self.add_request("__warmup_a__", [0] * 3, SamplingParams(max_tokens=2, ignore_eos=True))
                self._drain_warmup()
                shape_done()
                self._warmup_grammar_backend()
                shape_done()
                return
            # The full budget on CUDA (kernel variants and autotuning for large steps); on the
            # CPU, where one dynamic graph serves every size, a short prompt is enough.
            long_len = max(2, min(budget if on_gpu else 2 * cfg.block_size + 3, self.max_model_len - 4))
            self.add_request("__warmup_a__", [0] * 3, SamplingParams(max_tokens=3, ignore_eos=True))
            self.step()  # prefill a
            shape_done()
            self.add_request("__warmup_b__", [0] * long_len,
                             SamplingParams(max_tokens=2, ignore_eos=True, logprobs=1))
            self.add_request("__warmup_c__", [0] * 3,
                             SamplingParams(max_tokens=2, ignore_eos=True, repetition_penalty=1.1))
            self._drain_warmup()
            shape_done()
            # A batch of sampled decodes with top-k (the other tail branch), then a lone decode.
            for size in (min(4, cfg.max_num_seqs), 1):
                for i in range(size):
                    self.add_request(f"__warmup_d{i}__", [0] * 2,
                                     SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.8, top_k=5))
                self._drain_warmup()
                shape_done()
            self._warmup_constrained(shape_done)
        finally:
            for rid in [r for r in self._requests if r.startswith("__warmup")]:
                self.abort_request(rid)
            self._finish_inflight()
            self.batch.reconcile([])
            self.block_manager, self.scheduler = real

    def _warmup_constrained(self, shape_done: Callable[[], None]) -> None:
        """Grammar-constrained rows: the tail with a bitmask, alone and beside a penalised row (two
        more tail graphs), and on CUDA the bitmask kernel; also builds the grammar backend's
        tokenizer (about a second) before the first request instead of during it. A model whose
        tokenizer the backend cannot use serves no constrained request: nothing to warm."""
        spec = self._warmup_grammar_backend()
        if spec is None:
            shape_done()  # nothing to warm: both shapes are done
            shape_done()
            return
        constrained = SamplingParams(max_tokens=3, temperature=0.8, structured_outputs=spec)
        self.add_request("__warmup_g0__", [0] * 3, constrained)
        self._drain_warmup()
        shape_done()
        self.add_request("__warmup_g1__", [0] * 3, constrained)
        self.add_request("__warmup_g2__", [0] * 3,
                         SamplingParams(max_tokens=2, ignore_eos=True, repetition_penalty=1.1))
        self._drain_warmup()
        shape_done()

    def _warmup_grammar_backend(self) -> StructuredOutputsParams | None:
        """Builds the grammar backend's tokenizer; the spec it compiled, or None where the model
        serves no constrained request."""
        if self.tokenizer is None:
            return None
        try:
            spec = StructuredOutputsParams(regex="[a-z]{1,3}")
            self.structured.compile(SamplingParams(structured_outputs=spec))
        except Exception as exc:  # noqa: BLE001  (the requests will get the same error as a 400)
            logger.info("no constrained warm-up: %s", exc)
            return None
        return spec

    def _drain_warmup(self) -> None:
        while self.has_unfinished_requests():
            self.step()
        self._finish_inflight()

    def _finish_inflight(self) -> list[RequestOutput]:
        inflight, self._inflight = self._inflight, None
        return self._process(inflight) if inflight is not None else []

    def _legacy_warmup(self) -> None:
        """Compiles the step (one graph for every token count) and warms both launch paths (a
        prefill chunk, a one-token decode) before the first request.

        The warm-up sequence takes its blocks from a throwaway pool over the same cache, so the
        engine's own pool and prefix-cache counters start untouched.
        """
        pool = BlockManager(self.block_manager.num_blocks, self.config.block_size, enable_prefix_caching=False)
        for prompt_len in (2 * self.config.block_size + 3, 1):
            seq = Sequence("__warmup__", 0, [0] * prompt_len, SamplingParams(max_tokens=1), 1)
            if not pool.allocate_slots(seq, prompt_len):
                raise RuntimeError("KV cache too small for the warm-up step")
            self.runner.execute(SchedulerOutput([ScheduledSequence(seq, prompt_len)]))
            pool.free(seq)
        # Both tail graphs (penalties off, on); one graph serves every batch size.
        vocab = self.model_config.vocab_size
        for params in (SamplingParams(), SamplingParams(repetition_penalty=1.1)):
            row = TailRow(params, [0], [], seed=0)
            self.logits_tail(torch.zeros(1, vocab, device=self.device), *TailInputs.build([row], vocab, self.device).args)

    # ------------------------------------------------------------- requests
    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidParameterError("prompt", "this model has no tokenizer; pass token ids")
        return list(self.tokenizer(prompt, add_special_tokens=True).input_ids)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    output_kind: str = "cumulative", detokenize: bool = True) -> None:
        """`output_kind`: "cumulative" (after every step that changed it, everything so far),
        "delta" (after every such step, only the new tokens), or "final" (once, when finished:
        what the offline `LLM` needs). `detokenize=False`: the engine keeps no text and checks no
        stop strings (a front end that detokenizes outside the step loop does both, and aborts
        the request when a stop string completes)."""
        if output_kind not in OUTPUT_KINDS:
            raise InvalidParameterError("output_kind", f"must be one of {OUTPUT_KINDS}, got {output_kind!r}")
        params = params or SamplingParams()
        if request_id in self._requests:
            raise InvalidParameterError("request_id", f"request {request_id!r} is already running")
        params.validate_for_model(self.model_config.vocab_size, self.config.max_logprobs, self.config.max_n)
        grammar = self.structured.compile(params)  # cached; a bad spec is an InvalidParameterError
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidParameterError("prompt", "the prompt is empty")
            text, ids = prompt, self.tokenize(prompt)
        else:
            text, ids = None, list(prompt)
        if not ids:
            raise InvalidParameterError("prompt", "the prompt has no tokens")
        vocab = self.model_config.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise InvalidParameterError("prompt", f"token id {t!r} is outside the vocabulary [0, {vocab})")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise InvalidParameterError(
                "prompt", f"the prompt has {len(ids)} tokens; the context length is {self.max_model_len}")
        if params.max_tokens is not None and params.max_tokens > room:
            raise InvalidParameterError(
                "max_tokens", f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context length {self.max_model_len}")
        max_out = params.max_tokens if params.max_tokens is not None else room
        seqs = []
        for i in range(params.n):
            # Sequence i of a seeded request draws from seed + i; others from a fresh 63-bit seed.
            seed = wrap_int64(params.seed + i) if params.seed is not None else _SEED_SOURCE.getrandbits(63)
            seq = Sequence(request_id, i, ids, params, max_out, seed=seed)
            if self.tokenizer is not None and detokenize:
                seq.detokenizer = IncrementalDetokenizer(
                    self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop or [], include_stop_str_in_output=params.include_stop_str_in_output)
            self.structured.attach(seq, grammar)
            seqs.append(seq)
        self._requests[request_id] = _Request(request_id, text, ids, params, seqs, output_kind)
        for seq in seqs:
            self.scheduler.add(seq)
        self._prompt_tokens_total += len(ids) * len(seqs)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.status.finished:
                if seq.detokenizer is not None:
                    seq.detokenizer.finish()  # the text held back for a possible stop string is final
                self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
        return build_request_output(req, self.tokenizer, delta=req.output_kind == "delta")

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ----------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """One scheduler step. Asynchronous: launches this step, then returns the outputs of the
        previous one (whose device work ran while this one was prepared)."""
        if self.config.scheduling == "legacy":
            return self._legacy_step()
        outputs: list[RequestOutput] = []
        sched = self.scheduler.schedule()
        inflight, self._inflight = self._inflight, None
        if inflight is not None and sched.scheduled and any(
                self._needs_host_tail(s.seq) for s in sched.scheduled if s.completes_prompt):
            # Penalties, bias and min-tokens read the exact output so far: finish the step in flight.
            outputs += self._process(inflight)
            inflight = None
            sched.scheduled = [s for s in sched.scheduled if not s.seq.status.finished]
        if sched.scheduled:
            launched, early = self._launch(sched, inflight)
            if early is not None:  # the step in flight was finished inside the launch (grammar masks)
                outputs += early
                inflight = None
            if self.config.scheduling == "sync" and launched is not None:
                outputs += self._process(launched)
            else:
                self._inflight = launched
        if inflight is not None:
            outputs += self._process(inflight)
        return outputs

    def _needs_host_tail(self, seq: Sequence) -> bool:
        """Penalties, bias and min-tokens read the exact output so far: the step in flight is
        finished before this one is scheduled. Grammar-constrained rows do not need that: their
        masks are filled during the launch (`_launch`)."""
        p = seq.params
        return bool(p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
                    or p.logit_bias or len(seq.output_token_ids) + seq.num_pending < p.min_tokens)

    def _launch(self, sched: SchedulerOutput, inflight: InFlightStep | None = None
                ) -> tuple[InFlightStep | None, list[RequestOutput] | None]:
        """Launches a step; with grammar-constrained rows (and no host-built tail), the forward is
        enqueued first, then the step in flight is finished (its tokens accepted by the matchers)
        and the masks filled while the device runs this step's forward; the tail follows with the
        masks. Returns the step and, when it finished `inflight`, that step's outputs."""
        now = time.monotonic()
        for s in sched.scheduled:
            if s.seq.first_scheduled_time is None:
                s.seq.first_scheduled_time = now
        self.batch.reconcile(self.scheduler.running)
        plan = self.batch.plan(sched.scheduled, self.batch.sync(sched.scheduled))
        seqs = [s.seq for s in sched.scheduled]
        sampled = [seqs[i] for i in plan.sample_index.tolist()]
        offsets = np.fromiter((len(q.output_token_ids) + q.num_pending for q in sampled), np.int64, len(sampled))
        special = late_masks = None
        early: list[RequestOutput] | None = None
        if any(self._needs_host_tail(q) for q in sampled):  # the step in flight is finished already
            special = TailInputs.build([self._tail_row(q) for q in sampled], self.model_config.vocab_size,
                                       self.device)
        elif any(self.structured.constrains(q) for q in sampled):
            def late_masks() -> np.ndarray | None:
                nonlocal early
                if inflight is not None:
                    early = self._process(inflight)  # accepts step N's tokens: the masks of N + 1 need them
                return self.structured.bitmask_rows(sampled)
        asked = [q.params.logprobs for q in sampled if q.params.logprobs is not None]
        step = self.step_runner.launch(plan, seqs, special, offsets, max(asked) if asked else None,
                                       late_bitmask=late_masks)
        for s in sched.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self._computed_tokens_total += s.num_new_tokens
        for q in sampled:
            q.num_pending += 1
            self.batch.add_placeholder(q)
        return step, early

    def _process(self, step: InFlightStep) -> list[RequestOutput]:
        """Takes a finished step's sampled ids into the sequences: stop checks, text, outputs."""
        step.wait()
        token_ids = step.token_ids.tolist()
        lp = [t.tolist() for t in step.logprobs] if step.logprobs is not None else None
        now = time.monotonic()
        touched: dict[str, _Request] = {}
        for j, seq in enumerate(step.sampled_seqs):
            seq.num_pending -= 1
            if seq.status.finished:  # stopped by an earlier token, or aborted: this one is dropped
                continue
            if seq.params.logprobs is not None and lp is not None:
                k = seq.params.logprobs
                top_ids, top_vals = (lp[2][j][:k], lp[3][j][:k]) if len(lp) > 2 else ([], [])
                seq.logprobs.append((lp[0][j], lp[1][j], top_ids, top_vals))
                seq.cumulative_logprob += lp[0][j]
            self._append_token(seq, token_ids[j], now)
            self.batch.write_token(seq, token_ids[j])
            req = self._requests.get(seq.request_id)
            if req is not None:
                touched[seq.request_id] = req
        return self._outputs(touched.values())

    def _outputs(self, requests) -> list[RequestOutput]:
        outputs = []
        for req in requests:
            done = all(s.status.finished for s in req.seqs)
            if req.output_kind == "final" and not done:
                continue
            output = build_request_output(req, self.tokenizer, delta=req.output_kind == "delta")
            outputs.append(output)
            if output.finished:
                del self._requests[req.request_id]
        return outputs

    def _legacy_step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        now = time.monotonic()
        for s in sched.scheduled:
            if s.seq.first_scheduled_time is None:
                s.seq.first_scheduled_time = now
        logits, rows = self.runner.execute(sched)
        for s in sched.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self._computed_tokens_total += s.num_new_tokens
        touched: dict[str, _Request] = {}
        if rows:
            seqs = [sched.scheduled[i].seq for i in rows]
            inputs = TailInputs.build([self._tail_row(seq) for seq in seqs], logits.shape[-1], logits.device)
            sampled, _ = self.logits_tail(inputs.edit_logits(logits), *inputs.args)  # [N] each
            token_ids = sampled.tolist()  # the step's one host sync
            want_logprobs = any(seq.params.logprobs is not None for seq in seqs)
            lp = ranks = top_ids = top_vals = None
            if want_logprobs:  # of the raw logits, before bias and suppression, as vLLM gives them
                num_logprobs = max((seq.params.logprobs or 0) for seq in seqs)
                out = raw_logprobs(logits, sampled, num_logprobs)
                lp, ranks = out.logprobs.tolist(), out.ranks.tolist()
                top_ids = out.top_ids.tolist() if out.top_ids is not None else None
                top_vals = out.top_values.tolist() if out.top_values is not None else None
            now = time.monotonic()
            for j, seq in enumerate(seqs):
                if seq.params.logprobs is not None:
                    k = seq.params.logprobs
                    seq.logprobs.append((lp[j], ranks[j] if ranks else None,
                                         top_ids[j][:k] if top_ids else [], top_vals[j][:k] if top_vals else []))
                    seq.cumulative_logprob += lp[j]
                self._append_token(seq, token_ids[j], now)
                touched[seq.request_id] = self._requests[seq.request_id]
        return self._outputs(touched.values())

    def _tail_row(self, seq: Sequence) -> TailRow:
        params = seq.params
        suppressed: list[int] = []
        if len(seq.output_token_ids) < params.min_tokens:
            suppressed = sorted(set(params.stop_token_ids or []) | (set() if params.ignore_eos else self._eos_ids))
        return TailRow(params=params, prompt_token_ids=seq.prompt_token_ids,
                       output_token_ids=seq.output_token_ids, seed=seq.seed, suppressed_token_ids=suppressed,
                       bitmask=self.structured.bitmask_row(seq))

    def _append_token(self, seq: Sequence, token: int, now: float) -> None:
        seq.append_token(token)
        grammar_end = self.structured.accept(seq, token)  # None, or (status, reason) the grammar ends it with
        self._generation_tokens_total += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        params = seq.params
        n_out = len(seq.output_token_ids)
        status = None
        if not params.ignore_eos and token in self._eos_ids and n_out >= params.min_tokens:
            status = SequenceStatus.FINISHED_STOPPED
        elif params.stop_token_ids and token in params.stop_token_ids:
            status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, token
        if seq.detokenizer is not None:
            if status is None:  # EOS and stop tokens end the text; they stay in token_ids
                seq.detokenizer.add_tokens([token])
            if status is None and seq.detokenizer.stop_hit is not None:
                status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, seq.detokenizer.stop_hit
        if grammar_end is not None and (status is None or grammar_end[0] is SequenceStatus.FINISHED_ABORTED):
            status, seq.stop_reason = grammar_end  # a grammar error wins over the EOS it forced
        if status is None and (n_out >= seq.max_output_tokens or seq.num_tokens >= self.max_model_len):
            status = SequenceStatus.FINISHED_LENGTH
        if status is not None:
            if seq.detokenizer is not None and seq.detokenizer.stop_hit is None:
                seq.detokenizer.finish()
            self.scheduler.finish(seq, status)

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers, if any (also done at exit); the engine steps no more."""
        if self.tp is not None:
            self.tp.shutdown()

    # ---------------------------------------------------------------- stats
    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.pool.usage(), num_free_blocks=bm.num_free_blocks, num_total_blocks=bm.num_blocks,
            prefix_cache_queries=bm.prefix_cache_queries, prefix_cache_hits=bm.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions, prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total, computed_tokens_total=self._computed_tokens_total,
        )

    def _cuda_graph_status(self) -> str:
        graphs = self.runner.decode_graphs
        if graphs is None:
            return "off (enforce_eager)" if self.device.type == "cuda" else f"off ({self.device.type})"
        mixed = self.runner.mixed_graphs
        text = (f"{len(graphs.graphs)} decode buckets {list(graphs.buckets)} in {graphs.capture_seconds:.1f}s, "
                f"pool {graphs.pool_bytes / 2**20:.0f} MiB")
        if mixed is not None:
            text += (f"; {len(mixed.graphs)} mixed-step token buckets {list(mixed.buckets)} in "
                     f"{mixed.capture_seconds:.1f}s, pool {mixed.pool_bytes / 2**20:.0f} MiB")
        return text

    def _compile_status(self) -> str:
        pre = self.precompiled
        if pre is not None and pre.num_loaded and not self.compile_report.num_graphs:
            return f"loaded {pre.num_loaded} precompiled function(s) (no trace) in {self.compile_seconds:.1f}s"
        return f"compiled {self.compile_report.num_graphs} graph(s) in {self.compile_seconds:.1f}s"

    def startup_report(self) -> dict:
        return {
            "model": self.model_source,
            "architecture": self.model_config.architecture,
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantization": self.quantization,
            "kv_cache_dtype": str(self.kv_dtype).removeprefix("torch."),
            "device": str(self.device),
            "kv_cache_blocks": self.block_manager.num_blocks,
            "kv_cache_tokens": self.block_manager.num_blocks * self.config.block_size,
            "max_model_len": self.max_model_len,
            "compile_mode": self.config.compile_mode,
            "compile_status": self._compile_status(),
            "build": self.build_status.message if self.build_status else "none (no build_dir, no build cache)",
            "cuda_graphs": self._cuda_graph_status(),
            "load_seconds": round(self.load_seconds, 2),
        }
