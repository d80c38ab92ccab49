"""`ceiling sweep CONFIG`: the paper's study in miniature on the synthetic math task, in items that one
process or many workers run.

    ceiling sweep configs/sweep-tiny.yaml                       # one process, CPU (README: two workers)
    ceiling sweep configs/sweep-tiny.yaml --set sft.steps=100 --set sweep.branches=2
    ceiling sweep configs/sweep-tiny.yaml --plan                # the items, their dependencies and status
    ceiling sweep configs/sweep-tiny.yaml --worker [--nproc-per-node 8]   # one of N workers (any host)
    ceiling sweep configs/sweep-tiny.yaml --slurm --workers 8 --gpus-per-worker 8   # writes <run>/sweep.sbatch

Items of one scene (`sweep.scenes`, each a variant of `data.synthetic`), run in `runs/<name>/<scene>/`:
  <scene>/sft           SFT with a checkpoint at every validation (all kept), until `sft.until` (e.g. Severe)
                        or the `sft.steps` cap: the sub-phases of the val loss. A Stable-to-Severe jump is
                        replayed step by step (`fill_mild`) so that Mild has a checkpoint. It picks the RL
                        branches (`sweep.branch_rule`), the min-val-loss one always among them.
  <scene>/sft_eval      pass@1 of the base model and of every SFT checkpoint (P_sft)       after <scene>/sft
  <scene>/rl/<k>        an RL branch (rl.algorithm) from SFT checkpoint k                 after <scene>/sft
  <scene>/rl/0          pure RL from the base model
  <scene>/baseline/<a>  the synchronized SFT-RL baselines (LUFFY, SRFT, UPT) from the base model
With `sweep.early_stop: branch`, a branch stops once its predicted ceiling settles (`ceiling_stop_rule`); with
`compare`, the branches run side by side in slices and stop once they cannot win (engine/sweep/race.py). When every
item is done, the scene is written as a RETU scene (`scene.json`, compute in GFLOPs), every branch is fitted
(A_post = P_sft + PL_rl) and `sweep_report.md` collects tables, figures and the compute spent against a full
sweep (engine/sweep/report.py).

Workers (engine/sweep/worker.py): each claims the next ready item with a lock file in `<run>/locks/`, runs it
as a child process (`torchrun ... -m engine.cli sweep <run>/config.yaml --run-item ITEM` with
--nproc-per-node > 1, else python), publishes `<run>/items/ITEM.done.json` once, and exits when nothing is
left; the last one writes the report. A crashed worker's item is taken over once its lock is stale and
resumes from the item's own checkpoints. One process without --worker runs the same protocol in-process. The command line is
engine/sweep/cli.py.
Every worker checks its config against `<run>/config.yaml`, so a sweep never mixes configs. Several workers
on one node: give each its own GPUs (CUDA_VISIBLE_DEVICES=0-3 and 4-7 with --nproc-per-node 4).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from engine.analysis.early_stop import ceiling_stop_rule
from engine.analysis.phases import history_min, history_subphases
from engine.config import (
    DataConfig,
    RewardConfig,
    RLJobConfig,
    SceneSpec,
    SFTJobConfig,
    SweepJobConfig,
    dump_config,
    to_dict,
)
from engine.distributed import destroy_distributed
from engine.errors import CeilingError, ConfigError
from engine.rl.trainer import RLTrainer
from engine.rundir.checkpoint import checkpoint_name
from engine.rundir.files import read_json, write_json_atomic
from engine.rundir.lock import break_lock
from engine.sft.trainer import SFTTrainer
from engine.sweep.race import Race, per_branch_rule
from engine.sweep.worker import Item, RunDir, Worker

log = logging.getLogger("ceiling")


def select_branches(steps: list[int], best: int | None, k: int) -> list[int]:
    """`k` of the validation `steps`, evenly spread (first and last included), with `best` always among them."""
    if k >= len(steps):
        return list(steps)
    idx = [round(i * (len(steps) - 1) / (k - 1)) for i in range(k)] if k > 1 else [len(steps) - 1]
    chosen = [steps[i] for i in idx]
    if best is not None and best not in chosen:
        b = steps.index(best)
        nearest = min(range(k), key=lambda j: (abs(idx[j] - b), -idx[j]))
        chosen[nearest] = best
    return sorted(set(chosen))


def select_branches_by_subphase(steps: list[int], labels: list[str], best: int, k: int) -> list[int]:
    """One SFT step per sub-phase present (Stable: `best`; Mild: the middle of its span; Adaptive: middle;
    Severe: the last validation), in that order (the paper's two recommended switch points first), then the
    evenly spread ones (`select_branches`) until there are `k`."""
    chosen = [best]
    for phase in ("Mild", "Adaptive", "Severe"):
        span = [s for s, lab in zip(steps, labels) if lab == phase]
        if span and len(chosen) < k:
            chosen.append(span[-1] if phase == "Severe" else span[(len(span) - 1) // 2])
    for step in select_branches(steps, best, k) + list(steps):
        if len(chosen) >= k:
            break
        if step not in chosen:
            chosen.append(step)
    return sorted(chosen)


def sft_eval_steps(sft: dict, every: int) -> list[int]:
    """The SFT steps whose pass@1 the sweep measures: the base model (0), every branch's checkpoint, and the
    validations at multiples of `every` (0: all of them), the last one included."""
    steps = [h["step"] for h in sft["sft"]["val_history"]]
    keep = set(sft["branches"]) | {0, steps[-1]}
    return [0] + [s for s in steps if s in keep or not every or s % every == 0]


class Sweep:
    """The items of a sweep, their records in `<run>/items/`, and how to run one of them in this process."""

    def __init__(self, job: SweepJobConfig, stale_after: float = 600.0):
        self.job = job
        self.root = Path(job.run.output_dir) / job.run.name
        self.rundir = RunDir(self.root, stale_after)
        self.scenes = {s.name: s for s in job.sweep.scenes}

    # ------------------------------------------------------------ the plan
    def items(self) -> list[Item]:
        """Every item known so far, in the order workers take them: the SFT runs first (everything else of
        their scene waits on them), then per scene the SFT evaluation and the RL branches from its checkpoints
        (known once its SFT is done), then pure RL and the baselines (they need no SFT)."""
        items = [Item(f"{s}/sft", (), "SFT, a checkpoint at every validation") for s in self.scenes]
        for name in self.scenes:
            sft = self.rundir.record(f"{name}/sft")
            items.append(Item(f"{name}/sft_eval", (f"{name}/sft",), "pass@1 of the base model and each SFT checkpoint"))
            if sft and self.job.sweep.early_stop == "compare":
                items += self.race(name).items((f"{name}/sft",), f"{self.job.rl.algorithm} branches, side by side")
                continue
            for step in sft["branches"] if sft else []:
                items.append(Item(f"{name}/rl/{step}", (f"{name}/sft",), f"{self.job.rl.algorithm} from SFT step {step}"))
        for name, spec in self.scenes.items():
            deps, budget = (), ""
            if self.job.sweep.matched_compute:
                sft = self.rundir.record(f"{name}/sft")
                deps = (f"{name}/sft", f"{name}/rl/{sft['sft']['best']['step']}") if sft else (f"{name}/sft",)
                budget = ", matched to SFT-then-RL's compute"
            if spec.pure_rl:
                items.append(Item(f"{name}/rl/0", deps, f"{self.job.rl.algorithm} from the base model (pure RL){budget}"))
            for algo in self.job.sweep.baselines if spec.baselines else []:
                items.append(Item(f"{name}/baseline/{algo}", deps, f"{algo} from the base model{budget}"))
        return items

    def state(self) -> dict:
        """The finished items' records merged per scene (what the report reads); `done` in plan order."""
        state: dict = {"done": [], "scenes": {}}
        for item in self.items():
            rec = self.rundir.record(item.name)
            if rec is None:
                continue
            scene, kind, *rest = item.name.split("/")
            st = state["scenes"].setdefault(scene, {})
            if len(rest) > 1:  # a slice of a race: its time goes to its branch's record below
                st.setdefault("slices", {})[item.name] = rec.get("worker", {})
                continue
            state["done"].append(item.name)
            st.setdefault("workers", {})[item.name] = rec.get("worker", {})
            if kind == "sft":
                st["sft"], st["branches"] = rec["sft"], rec["branches"]
            elif kind == "sft_eval":
                st["sft_pass1"], st["n_eval"] = rec["sft_pass1"], rec["n_eval"]
            else:
                st.setdefault("rl", {})[f"{kind}/{rest[0]}"] = rec["rl"]
        for scene, st in state["scenes"].items():
            for name, who in st.pop("slices", {}).items():  # a race branch ran on the hosts of its slices
                branch = st["workers"].setdefault(name.rsplit("/", 1)[0], {})
                branch["seconds"] = branch.get("seconds", 0.0) + who.get("seconds", 0.0)
                branch.setdefault("slice_hosts", []).append(who.get("host", "?"))
            if self.job.sweep.early_stop == "compare" and "branches" in st:
                st["race"] = self.race(scene).summary()
        return state

    def race(self, scene: str) -> Race:
        """The live comparison of `scene`'s RL branches (sweep.early_stop: compare), read from the records."""
        job = self.job
        return Race(scene, self._need(f"{scene}/sft")["branches"], self.rundir.record, job.rl.steps,
                    job.rl.eval_every, job.sweep)

    def run_dirs(self, name: str) -> list[Path]:
        """The run directories an item writes (their run locks are cleared when a stale item is taken over)."""
        scene, kind, *rest = name.split("/")
        if kind == "sft":
            return [self.root / scene / "sft", self.root / scene / "sft_fill"]
        sub = {"sft_eval": None, "rl": f"rl_{rest[0] if rest else 0}",
               "baseline": f"baseline_{rest[0] if rest else ''}"}[kind]
        return [self.root / scene / sub] if sub else []

    def check_config(self) -> None:
        """Write `<run>/config.yaml` once; every later process must resolve to the same config."""
        from engine.config import load_config

        path = self.root / "config.yaml"
        self.root.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            tmp = path.with_name(f".config.yaml.{os.getpid()}.tmp")
            dump_config(self.job, tmp)
            try:
                os.link(tmp, path)  # the first process wins; the others compare against it
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        mine, theirs = to_dict(self.job), to_dict(load_config(path, SweepJobConfig))
        diff = _diff(theirs, mine)
        if diff:
            raise ConfigError(f"{path}: this sweep already runs with another config ({'; '.join(diff[:5])}); "
                              f"run with CONFIG = {path}, or choose another run.name")

    # ------------------------------------------------------------ running one item in this process
    def run_item(self, name: str) -> dict:
        """Run item `name` here (resuming from its own checkpoints) and return its record."""
        scene, kind, *rest = name.split("/")
        if scene not in self.scenes or kind not in ("sft", "sft_eval", "rl", "baseline") or len(rest) > 1 + (kind == "rl"):
            raise ConfigError(f"sweep: no item {name!r} (see --plan)")
        spec = self.scenes[scene]
        if kind == "sft":
            return self.run_sft(spec)
        if kind == "sft_eval":
            return self.run_sft_eval(spec, self._need(f"{scene}/sft"))
        if kind == "rl":
            step, sweep = int(rest[0]), self.job.sweep
            if step and step not in self._need(f"{scene}/sft")["branches"]:
                raise ConfigError(f"sweep: {name}: SFT step {step} is not one of the branches of {scene}")
            if step and sweep.early_stop == "compare":
                race = self.race(scene)
                if len(rest) == 1:
                    return race.branch_record(step)
                pause_at = race.slice_target(step, int(rest[1].lstrip("r")))
                return self.run_rl(spec, name, self.job.rl.algorithm, step, False, pause_at)
            return self.run_rl(spec, name, self.job.rl.algorithm, step,
                               sweep.early_stop == "branch" and (step > 0 or not sweep.matched_compute))
        return self.run_rl(spec, name, rest[0], None, False)

    def matched_budget(self, scene: str) -> dict | None:
        """The sequential paradigm's compute in `scene` (EFLOPs): SFT to the min-val-loss checkpoint + the RL
        branch from it; None when `sweep.matched_compute` is off."""
        if not self.job.sweep.matched_compute:
            return None
        sft = self._need(f"{scene}/sft")["sft"]
        best = sft["best"]["step"]
        rl = dict(self._need(f"{scene}/rl/{best}")["rl"])
        if self.job.sweep.early_stop == "compare" and rl["steps"] < rl["planned_steps"]:
            # the race stopped it: the sequential paradigm would have run its whole plan
            rl["exaflops"], rl["steps"] = rl["exaflops"] * rl["planned_steps"] / max(rl["steps"], 1), rl["planned_steps"]
        sft_ef = next(h["exaflops"] for h in sft["val_history"] if h["step"] == best)
        return {"sft_step": best, "sft_exaflops": sft_ef, "rl_exaflops": rl["exaflops"],
                "exaflops": sft_ef + rl["exaflops"], "rl_step_exaflops": rl["exaflops"] / max(rl["steps"], 1)}

    def _need(self, name: str) -> dict:
        rec = self.rundir.record(name)
        if rec is None:
            raise ConfigError(f"sweep: {name} is not done yet (items run in dependency order: see --plan)")
        return rec

    def scene_data(self, spec: SceneSpec) -> DataConfig:
        """The scene's SFT data: a variant of data.synthetic, or its files (the sweep's where it names none)."""
        data = self.job.data
        if data.synthetic is None:
            return replace(data, train_path=spec.train_path or data.train_path, val_path=spec.val_path or data.val_path)
        overrides = {k: v for k, v in (("num_train", spec.num_train), ("difficulty_mix", spec.difficulty_mix))
                     if v is not None}
        return replace(data, synthetic=replace(data.synthetic, **overrides))

    def scene_eval_path(self, spec: SceneSpec):
        """The held-out set that scores the scene's base model, SFT checkpoints and RL branches."""
        if self.job.data.synthetic is not None:
            return self.root / spec.name / "sft" / "data" / "eval.jsonl"
        return spec.eval_path or self.job.rl.eval_path

    def reward(self) -> RewardConfig:
        """One reward for every item of the sweep (baselines included): the `reward:` section, its mode resolved
        with the sweep's rl.algorithm, so a checkpoint scores the same wherever the sweep scores it."""
        from engine.rl.algorithms import ALGORITHMS

        return replace(self.job.reward, mode=self.job.reward.mode or ALGORITHMS[self.job.rl.algorithm].reward_mode)

    def sft_job(self, spec: SceneSpec) -> SFTJobConfig:
        """The scene's SFT: a checkpoint at every validation, all kept."""
        job = self.job
        sft = replace(job.sft, checkpoint_every=job.sft.val_every, keep_checkpoints=0, save_best=True,
                      export_hf=False)
        return SFTJobConfig(run=replace(job.run, output_dir=str(self.root / spec.name), name="sft"),
                            model=job.model, data=self.scene_data(spec), sft=sft, kernels=job.kernels, fsdp=job.fsdp)

    def run_sft(self, spec: SceneSpec) -> dict:
        job, sft_job = self.job, self.sft_job(spec)
        sft = sft_job.sft
        summary = SFTTrainer(sft_job).fit()
        destroy_distributed()
        if not summary["val_history"]:
            raise ValueError("sweep: SFT recorded no validation (need sft.val_every > 0 and a val split)")
        summary = self.fill_mild(spec, sft_job, summary)
        steps = [h["step"] for h in summary["val_history"]]
        k = spec.branches or job.sweep.branches
        history = summary["val_history"]
        i, smoothed = history_min(history, sft)  # the Stable point (the raw minimum at subphase_window 1)
        best = {"step": steps[i], "val_loss": history[i]["val_loss"], "smoothed_val_loss": smoothed}
        if job.sweep.branch_rule == "subphase":
            labels = history_subphases(history, sft)
            branches = select_branches_by_subphase(steps, labels, best["step"], k)
        else:
            branches = select_branches(steps, best["step"], k)
        log.info("sweep %s: RL branches from SFT steps %s", spec.name, branches)
        record = {k: summary[k] for k in ("steps", "exaflops", "val_history", "train_rows")} | {"best": best}
        record["until"] = {"target": sft.until, "cap": sft.steps, "stopped": summary["stopped"],
                           "filled": summary.get("filled")}
        return {"sft": record, "branches": branches}

    def fill_mild(self, spec: SceneSpec, sft_job: SFTJobConfig, summary: dict) -> dict:
        """When the validation loss went from Stable straight to Severe (the Mild band fell between two
        validations), replay the steps between them from the last Stable checkpoint in `<scene>/sft_fill`, with a
        validation and a checkpoint at every step, and merge those validations into the summary. Resume is
        exact, so the replayed steps are the run's own; the gap's checkpoints are found by `sft_checkpoint`."""
        cfg = sft_job.sft
        history = summary["val_history"]
        labels = history_subphases(history, cfg)
        if "Mild" in labels or "Severe" not in labels:
            return summary
        last = max(i for i, lab in enumerate(labels) if lab == "Stable")
        start, end = history[last]["step"], history[last + 1]["step"]
        if end - start < 2:
            return summary
        log.info("sweep %s: the validation loss went from Stable (step %d) to Severe (step %d) with no Mild "
                 "validation: replaying steps %d-%d with a validation and checkpoint at each", spec.name, start, end,
                 start + 1, end - 1)
        fill_root = self.root / spec.name / "sft_fill" / "checkpoints"
        if not (fill_root / checkpoint_name(start)).is_dir():  # seed the replay with the last Stable checkpoint (hard links: never rewritten)
            seed = fill_root / f"{checkpoint_name(start)}.tmp"  # a crash leaves a .tmp, which resume removes
            shutil.rmtree(seed, ignore_errors=True)
            shutil.copytree(self.sft_checkpoint(spec.name, start), seed, copy_function=os.link)
            seed.rename(fill_root / checkpoint_name(start))
        fill_job = replace(sft_job, run=replace(sft_job.run, name="sft_fill"),
                           sft=replace(cfg, until="steps", val_every=1, checkpoint_every=1))
        filled = SFTTrainer(fill_job).fit(pause_at=end - 1)
        destroy_distributed()
        merged = sorted(history + [h for h in filled["val_history"] if start < h["step"] < end],
                        key=lambda h: h["step"])
        best = min(merged, key=lambda h: h["val_loss"])
        return dict(summary, val_history=merged, best={"step": best["step"], "val_loss": best["val_loss"]},
                    filled=[start + 1, end - 1])

    def sft_checkpoint(self, scene: str, step: int) -> Path:
        """SFT checkpoint `step` of `scene`: the run's own, or one of the replayed gap's (`fill_mild`)."""
        for run in ("sft", "sft_fill"):
            path = self.root / scene / run / "checkpoints" / checkpoint_name(step)
            if path.is_dir():
                return path
        raise ConfigError(f"sweep: {scene}: no SFT checkpoint of step {step} in {self.root / scene}/sft(_fill)")

    def run_sft_eval(self, spec: SceneSpec, sft: dict) -> dict:
        """pass@1 (%) of the base model ("0") and the SFT checkpoints (`sft_eval_steps`), one at a time, on one rollout backend
        (`rollout.backend`, the run's device): it starts with the base weights and receives each checkpoint by
        `sync_weights`. Resumable through `<scene>/sft_eval.partial.json`."""
        from engine.config import EvalConfig
        from engine.data.tokenizer import model_tokenizer
        from engine.distributed import init_distributed
        from engine.evaluate import Benchmark, eval_rollout, eval_seed, evaluate, load_checkpoint_model
        from engine.reward import Reward

        job, sweep = self.job, self.job.sweep
        partial_path = self.root / spec.name / "sft_eval.partial.json"
        partial = read_json(partial_path) or {"sft_pass1": {}, "n_eval": None}
        scores = partial["sft_pass1"]
        todo = [s for s in sft_eval_steps(sft, sweep.sft_eval_every) if str(s) not in scores]
        if not todo:
            return {"sft_pass1": scores, "n_eval": partial["n_eval"]}
        tokenizer = model_tokenizer(job.model)
        cfg = EvalConfig(samples=sweep.eval_samples, temperature=job.rl.eval_temperature,
                         max_new_tokens=job.rl.max_new_tokens, max_prompts=job.rl.eval_max_prompts,
                         max_prompt_len=job.rl.max_prompt_len, batch_size=job.rl.rollout_batch_size)
        bench = Benchmark.load("eval", self.scene_eval_path(spec), tokenizer, cfg.max_prompts, job.data.fields,
                               cfg.max_prompt_len)
        reward = Reward.of(self.reward())
        info = init_distributed(job.run.device)
        rollout = eval_rollout(job.rollout, job.model, tokenizer, info, workdir=self.root / spec.name / "sft_eval",
                               seed=job.run.seed, max_model_len=Benchmark.max_model_len([bench], cfg.max_new_tokens),
                               batch_size=cfg.batch_size)
        try:
            for version, step in enumerate(todo, start=1):
                if step:
                    model = load_checkpoint_model(self.sft_checkpoint(spec.name, step), job.model)
                    rollout.sync_weights(model, version)
                    del model
                result = evaluate(rollout, [bench], cfg, seed=eval_seed(job.run.seed), reward=reward, step=step)
                scores[str(step)] = result.scores["eval"]
                partial["n_eval"], partial["backend"] = result.counts["eval"], result.backend
                log.info("sweep %s: pass@1 of SFT step %d = %.2f%% (%s)", spec.name, step, scores[str(step)],
                         result.backend)
                write_json_atomic(partial_path, partial)
        finally:
            rollout.close()
            destroy_distributed()
        return {"sft_pass1": scores, "n_eval": partial["n_eval"], "backend": partial["backend"]}

    def rl_job(self, spec: SceneSpec, key: str, algorithm: str, init_step: int | None) -> tuple[RLJobConfig, dict | None]:
        """Item `key` as an RL job (with the sweep's rollout, kernels and FSDP sections) and its compute budget."""
        job = self.job
        ckpt = self.sft_checkpoint(spec.name, init_step) if init_step else None
        name = f"rl_{init_step or 0}" if "/rl/" in key else f"baseline_{algorithm}"
        rl = replace(job.rl, algorithm=algorithm, init_checkpoint=str(ckpt) if ckpt else None, export_hf=False,
                     prompts_path=spec.prompts_path or job.rl.prompts_path,
                     eval_path=job.rl.eval_path if job.data.synthetic is not None else self.scene_eval_path(spec))
        budget = self.matched_budget(spec.name) if not init_step else None
        if budget is not None:
            # Steps are an upper bound (the base model's short answers make a step cheaper than a branch's);
            # evaluations about as often, in compute, as in the branch the budget comes from.
            est = budget["exaflops"] / budget["rl_step_exaflops"]
            rl = replace(rl, max_exaflops=budget["exaflops"], steps=max(job.rl.steps, math.ceil(4 * est)),
                         eval_every=max(1, round(job.rl.eval_every * est / job.rl.steps)))
        rl_job = RLJobConfig(run=replace(job.run, output_dir=str(self.root / spec.name), name=name),
                             model=job.model, data=self.scene_data(spec), rl=rl, reward=self.reward(),
                             rollout=job.rollout, kernels=job.kernels, fsdp=job.fsdp)
        return rl_job, budget

    def run_rl(self, spec: SceneSpec, key: str, algorithm: str, init_step: int | None, early_stop: bool,
               pause_at: int | None = None) -> dict:
        job, sweep = self.job, self.job.sweep
        rl_job, budget = self.rl_job(spec, key, algorithm, init_step)
        name = rl_job.run.name
        pb = per_branch_rule(sweep)
        rule = ceiling_stop_rule(pb.tol, pb.patience, pb.min_points, min_fraction=pb.min_fraction,
                                 planned_steps=job.rl.steps) if early_stop else None
        trainer = RLTrainer(rl_job)
        try:
            summary = trainer.fit(stop_when=rule, pause_at=pause_at)
        finally:
            trainer.rollout.close()
            destroy_distributed()
        return {"rl": {"algorithm": algorithm, "init_step": init_step or 0, "dir": name,
                       "steps": summary["steps"], "planned_steps": job.rl.steps if budget is None else summary["steps"],
                       "exaflops": summary["exaflops"], "stopped": summary["stopped"], "budget": budget,
                       "eval_history": summary["eval_history"], "rollout_backend": summary["rollout_backend"]}}

    # ------------------------------------------------------------ whole runs
    def worker(self, run_item=None, heartbeat: float = 30.0, poll: float = 10.0, retry_failed: bool = False) -> Worker:
        """A worker over this sweep; `run_item(item, lock, heartbeat) -> record` defaults to this process."""
        def clear_run_locks(name: str, holder: dict) -> None:
            # The stale holder's child held the item's run locks (engine/rundir/run_lock.py). On this host run_lock
            # sees a dead pid itself; from another host it cannot, so the locks of the dead host go here.
            for d in self.run_dirs(name):
                lock = read_json(d / "run.lock")
                if lock and lock.get("host") == holder.get("host") != self.rundir.host \
                        and break_lock(d / "run.lock", lock):
                    log.warning("sweep: %s: removed the run lock of pid %s on %s", d, lock.get("pid"), lock.get("host"))
            time.sleep(min(2.0, heartbeat))  # let an orphaned child notice the takeover and exit

        def in_process(item, lock, hb):
            return self.run_item(item.name)

        return Worker(self.rundir, self.items, run_item or in_process, heartbeat=heartbeat, poll=poll,
                      retry_failed=retry_failed, on_takeover=clear_run_locks)

    def write_report(self) -> Path | None:
        """The report, once every item is done (None before); any worker may write it, the last one does."""
        from engine.sweep.report import write_sweep_report

        if any(not self.rundir.is_done(i.name) for i in self.items()):
            return None
        state = self.state()
        write_json_atomic(self.root / "sweep.json", state)
        return write_sweep_report(self.job, self.root, state)

    def run(self) -> dict:
        """Every item in this process (the claim/lock/done protocol still applies: workers may join), then the
        report."""
        self.check_config()
        result = self.worker(poll=5.0).run()
        if not result.ok:
            raise CeilingError(f"sweep: items failed or blocked: {', '.join(result.failed or result.blocked)} (see "
                               f"{self.root}/items/*.failed.json; rerun with --retry-failed)")
        self.write_report()
        return self.state()

    def plan_text(self) -> str:
        """The items, their dependencies and where each stands; the branches not yet chosen as one line."""
        lines = [f"sweep {self.root}: items in the order workers take them", ""] + self.rundir.describe(self.items())
        for name, spec in self.scenes.items():
            if self.rundir.record(f"{name}/sft") is None:
                lines.append(f"{name + '/rl/<k>':28s} {'waiting':12s} {spec.branches or self.job.sweep.branches} RL branches from "
                             f"SFT checkpoints, chosen when {name}/sft ends  after {name}/sft")
        return "\n".join(lines) + "\n"


def _diff(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{where}.{k}".lstrip("."))]
    return [] if a == b else [f"{where}: {a!r} there, {b!r} here"]
