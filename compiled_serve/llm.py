"""The offline API: `LLM(model=...).generate(prompts, params)` and `.chat(messages)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

from compiled_serve.config import EngineConfig
from compiled_serve.engine.llm_engine import LLMEngine
from compiled_serve.errors import InvalidParameterError
from compiled_serve.outputs import RequestOutput
from compiled_serve.sampling_params import SamplingParams
from compiled_serve.startup import start_engine

_PROGRESS_MIN_REQUESTS = 8


class LLM:
    """Offline batched generation.

    `LLM()` runs the embedded SmolLM2-135M-Instruct; `LLM(model=path_or_repo, **config)` takes any
    EngineConfig field (dtype, device, max_num_seqs, compile_mode, ...).
    """

    def __init__(self, model: str | None = None, **config: Any):
        # Load, compile and warm-up take a while: each phase goes to the log (compiled_serve.startup).
        self.llm_engine = start_engine(EngineConfig(model=model, **config))
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        """Wraps an engine that already exists (e.g. the one a server runs, for parity checks)."""
        llm = cls.__new__(cls)
        llm.llm_engine = engine
        llm._ids = itertools.count()
        return llm

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Seq[str] | Seq[list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_progress: bool = True,
    ) -> list[RequestOutput]:
        prompt_list = _normalize_prompts(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise InvalidParameterError(
                    "sampling_params", f"{len(params_list)} params for {len(prompt_list)} prompts")
        engine = self.llm_engine
        for params in {id(p): p for p in params_list}.values():
            engine.structured.compile(params)  # every grammar before any request: a bad spec runs nothing
        ids = []
        try:
            for prompt, params in zip(prompt_list, params_list):
                rid = f"offline-{next(self._ids)}"
                engine.add_request(rid, prompt, params, output_kind="final")
                ids.append(rid)
        except Exception:
            for rid in ids:
                engine.abort_request(rid)
            raise
        return self._run(ids, use_progress and len(ids) >= _PROGRESS_MIN_REQUESTS)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        use_progress: bool = True,
    ) -> list[RequestOutput]:
        from compiled_serve.chat_template import render_chat

        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        template = chat_template or self.llm_engine.chat_template
        if template is None:
            raise InvalidParameterError("chat_template", "the model has no chat template; pass one")
        tok = self.llm_engine.tokenizer
        prompts = []
        for conv in conversations:
            text = render_chat(conv, template, add_generation_prompt=add_generation_prompt,
                               bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
            prompts.append(list(tok(text, add_special_tokens=False).input_ids))
        return self.generate(prompts, sampling_params, use_progress)

    def _run(self, ids: list[str], progress: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        done: dict[str, RequestOutput] = {}
        pending = set(ids)
        bar = None
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            bar = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           TextColumn("{task.fields[tps]}"), transient=True)
            task = bar.add_task("gen", total=len(ids), tps="")
            bar.start()
        try:
            generated = 0
            import time

            start = time.perf_counter()
            while pending:
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        done[out.request_id] = out
                        pending.discard(out.request_id)
                        generated += sum(len(o.token_ids) for o in out.outputs)
                        if bar is not None:
                            rate = generated / max(time.perf_counter() - start, 1e-9)
                            bar.update(task, advance=1, tps=f"{rate:.1f} out tok/s")
                if pending and not engine.has_unfinished_requests():
                    raise RuntimeError("engine stopped with requests pending")
        except BaseException:
            for rid in pending:
                engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.stop()
        return [done[rid] for rid in ids]


def _normalize_prompts(prompts: Any) -> list[str | list[int]]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise InvalidParameterError("prompts", "no prompts given")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]
        out = []
        for p in prompts:
            if isinstance(p, str) or (isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p)):
                out.append(p if isinstance(p, str) else list(p))
            else:
                raise InvalidParameterError("prompts", "each prompt must be a string or a list of token ids")
        return out
    raise InvalidParameterError("prompts", "prompts must be a string, a list of strings, or token-id lists")
