"""Same-process A/B of the CPU step: the direct call of the compiled graph (passes/direct_call.py)
   against dynamo's armed path, alternating 128-token greedy generates of the embedded model.

    python bench/cpu_direct_step_ab.py
"""
import statistics
import time

import torch

torch.set_num_threads(2)
from compiled_serve import LLM, SamplingParams
llm = LLM(compile_mode="inductor", max_num_seqs=64, quantization="gguf")
sf = llm.llm_engine.runner.step_fn
direct = sf.direct
print("direct:", direct is not None)
p = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
prompt = "Write a short story about a robot who learns to paint. The robot lived in a"
res = {"direct": [], "dynamo": []}
texts = {}
llm.generate([prompt], p, use_progress=False)
for i in range(6):
    for name in ("direct", "dynamo"):
        sf.direct = direct if name == "direct" else None
        t = time.perf_counter(); out = llm.generate([prompt], p, use_progress=False); dt = time.perf_counter() - t
        res[name].append(128 / dt)
        texts.setdefault(name, out[0].outputs[0].token_ids)
for k, v in res.items(): print(k, [round(x, 1) for x in v], "median", round(statistics.median(v), 1))
print("same tokens:", texts["direct"] == texts["dynamo"])
