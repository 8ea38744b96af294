"""Per-rank worker for tests/test_gpu_path.py: the code a GPU run executes, on a CPU. Run with
RLVR_GPU_PATH=1, as plain python (a one-rank gloo group, as distributed.init() makes on a GPU) or
under torchrun:

    RLVR_GPU_PATH=1 python tests/gpu_path_worker.py rl OUT MODEL_DIR [train_rl.py flags]
    RLVR_GPU_PATH=1 python tests/gpu_path_worker.py reshard OUT MODEL_DIR

rl: train_rl.train() as train_rl.py runs it (master-key probe, rollouts, a local verifier's rewards,
an update), recording in OUT/facts_rank{R}.json how it ran: the process group, whether the policy
and the verifier were FSDP2-sharded, the dtype their decoder layers computed in.
reshard: the FSDP all-gathers of one forward + backward after generate(), per FSDP unit.
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlvr import distributed, model  # noqa: E402


def layer_dtypes(lm) -> set:
    """The dtypes the first decoder layer's input hidden states arrive in (filled as it runs)."""
    seen = set()
    lm.model.layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.add(str((args[0] if args else kwargs["hidden_states"]).dtype)),
        with_kwargs=True)
    return seen


def rl(out: Path, argv: list[str]) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    import train_rl

    facts = {}
    load_models, load_verifiers = train_rl.load_models, train_rl.load_verifiers

    def recorded_models(*args, **kwargs):
        policy, ref = load_models(*args, **kwargs)
        facts.update(policy_fsdp=isinstance(policy, FSDPModule), policy_master=str(next(policy.parameters()).dtype))
        facts["policy_compute"] = layer_dtypes(policy)
        return policy, ref

    def recorded_verifiers(*args, **kwargs):
        judges = load_verifiers(*args, **kwargs)
        lm = judges["reward"].model
        facts.update(verifier_sharded=all(isinstance(p, DTensor) for p in lm.parameters()),
                     verifier_dtype=str(next(lm.parameters()).dtype))
        facts["verifier_compute"] = layer_dtypes(lm)
        return judges

    train_rl.load_models, train_rl.load_verifiers = recorded_models, recorded_verifiers
    cfg, vopts = train_rl.parse_config(argv)
    try:
        result = train_rl.train(cfg, vopts)
        facts.update(group=distributed.is_initialized(), world=distributed.world_size(),
                     history=[{k: v for k, v in m.items() if isinstance(v, (int, float))} for m in result["history"]])
        rank = distributed.rank()
    finally:
        distributed.shutdown()
    facts = {k: sorted(v) if isinstance(v, set) else v for k, v in facts.items()}
    (out / f"facts_rank{rank}.json").write_text(json.dumps(facts))


def reshard(out: Path, model_dir: str) -> None:
    """All-gathers per FSDP unit in one forward + backward of the log-prob path, after a generate()."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    rank, _, device = distributed.init()
    tok = model.load_tokenizer(model_dir)
    lm = model.shard_model(model.load_model(model_dir, device, torch.float32, compute_dtype=model.compute_dtype()),
                           mixed_precision=True)
    model.generate(lm, tok, [[5, 6, 7], [8, 9]], 3, row_seeds=[1, 2])
    gathers, unshard = {}, FSDPParamGroup.unshard

    def counted(self, *args, **kwargs):
        pending = self._all_gather_result is not None
        result = unshard(self, *args, **kwargs)
        if not pending and self._all_gather_result is not None:  # this call issued an all-gather
            gathers[self._module_fqn or "root"] = gathers.get(self._module_fqn or "root", 0) + 1
        return result

    FSDPParamGroup.unshard = counted
    ids, pos, att, tmask = model.rows([[5, 6, 7, 8, 9], [3, 4, 5]], [[0, 0, 1, 1, 1], [0, 1, 1]], False, 0, device)
    lp, _ = model.token_logprobs(lm, ids, pos, tmask, att)
    lp.sum().backward()
    FSDPParamGroup.unshard = unshard
    distributed.shutdown()
    (out / f"gathers_rank{rank}.json").write_text(json.dumps(gathers))


if __name__ == "__main__":
    assert os.environ.get(distributed.GPU_PATH_ENV) == "1", f"run with {distributed.GPU_PATH_ENV}=1"
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    if mode == "rl":
        rl(out_dir, sys.argv[3:])
    else:
        reshard(out_dir, sys.argv[3])
