"""`steer optimize`: search an intervention's shape with multi-objective TPE.

Two objectives, both minimised, measured for every trial on the same prompts:

- behaviour: in mode "remove", the share of target prompts whose greedy completion
  (`max_new_tokens`, short: a refusal shows in its first words) the judge calls the
  behaviour (default judge: `repair.evaluate.refuses`); in mode "add", the share it
  does not. Removing refusal measures how little it takes to undo it; adding it asks
  how much refusal a model can be given.
- KL: the mean over harmless prompts of KL(original ‖ edited) of the next-token
  distribution after the prompt, the first token of the answer.

The search space (`suggest`) holds, per trial: the direction's source layer (fractional,
in `source_range` × depth) or "per layer"; whether the direction is projected off the
harmless mean; in mode "remove", whether the edit keeps each writer row's norm
(`Point.norms`); and for each writer kind (attention, MLP) a `Profile`: peak weight,
peak position, floor as a fraction of the peak, and width. Its ranges contain those of
heretic-llm 1.4 (peak 0.8–1.5, position 0.6–1.0 of depth, width 1–0.6 of depth), and
go further (a peak of 0 switches a writer kind off).

In mode "remove" the directions are read as the output head sees them: the last
layer's state after the model's final norm (`measure.directions`, `head_view`), as
heretic-llm does; the other layers' states are the block outputs. On the aligned
SmolLM2 the last layer's direction read this way removes far more refusal at the same
KL (docs/steer_optimize.md).

`Optuna`'s TPESampler (multivariate, `startup` random trials first, seeded) proposes
points; the first trial is the plain full ablation of Arditi et al. (weight 1 at every
layer, direction from 60 % of depth) so the search starts from the known answer, and in
mode "remove" the second is the late ablation: weight 1 on the last 40 % of layers,
each with its own direction projected off the harmless mean. The first removes most;
the second costs the least KL for what it removes (docs/steer_optimize.md).

With a `goal` (the "target" rule's share), the sampler is told that a trial is feasible
only when its behaviour share is at most the goal (TPE's `constraints_func`): until one
is, it proposes near the trials closest to the goal; then it looks for lower KL among
the feasible ones. Without it, the two objectives pull the proposals apart along the
front, and with a few dozen trials most of them go to edits too weak to matter (on
the aligned SmolLM2, 14 of 16 trials kept refusing ≥ 75 % of the prompts:
docs/steer_optimize.md).

Choosing a point from the Pareto front (`choose`):
- "target" (default): the lowest KL among trials whose behaviour share is at most
  `target`; when none is, the lowest behaviour share (then the lowest KL).
- "knee": the front point nearest to (0, 0) after scaling each objective by its
  range on the front.
- "trial:N": trial N.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from weightops.prompting import greedy_completions
from weightops.repair.evaluate import refuses
from weightops.steering.layers import SteeringError
from weightops.steering.measure import (
    directions,
    first_token_logprobs,
    kl_divergence,
    prompt_ids,
)
from weightops.steering.profile import COMPONENTS, MODES, Directions, Point, Profile, applied

Judge = Callable[[str, str], bool]


def refusal_judge(prompt: str, completion: str) -> bool:
    """The default judge: the completion reads as a refusal."""
    return refuses(completion)


@dataclass
class Trial:
    number: int
    point: Point
    behaviour: float
    kl: float
    seconds: float


@dataclass
class Study:
    """Every trial of a search, with the unedited model's behaviour share."""

    mode: str
    depth: int
    baseline: float
    trials: list[Trial] = field(default_factory=list)

    def front(self) -> list[Trial]:
        """The Pareto front (no other trial is at least as good in both objectives and
        better in one), ordered by behaviour share, then KL."""
        out = []
        for t in self.trials:
            dominated = any(
                o.behaviour <= t.behaviour
                and o.kl <= t.kl
                and (o.behaviour < t.behaviour or o.kl < t.kl)
                for o in self.trials
            )
            if not dominated:
                out.append(t)
        return sorted(out, key=lambda t: (t.behaviour, t.kl, t.number))

    def choose(self, rule: str = "target", target: float = 0.05) -> Trial:
        """The trial a rule picks (module docstring)."""
        if not self.trials:
            raise SteeringError("no finished trials to choose from")
        if rule == "target":
            ok = [t for t in self.trials if t.behaviour <= target]
            if ok:
                return min(ok, key=lambda t: (t.kl, t.behaviour, t.number))
            return min(self.trials, key=lambda t: (t.behaviour, t.kl, t.number))
        if rule == "knee":
            front = self.front()
            b = [t.behaviour for t in front]
            k = [t.kl for t in front]
            sb = (max(b) - min(b)) or 1.0
            sk = (max(k) - min(k)) or 1.0
            return min(
                front,
                key=lambda t: ((t.behaviour - min(b)) / sb) ** 2 + ((t.kl - min(k)) / sk) ** 2,
            )
        if rule.startswith("trial:") and rule[6:].isdigit():
            n = int(rule[6:])
            for t in self.trials:
                if t.number == n:
                    return t
            raise SteeringError(
                f"--choose {rule}: there is no trial {n} (0 … {len(self.trials) - 1})"
            )
        raise SteeringError(f"--choose {rule!r}: give target, knee or trial:N")


# ------------------------------------------------------------------ search


def suggest(trial: Any, mode: str, depth: int) -> Point:
    """A point from an Optuna trial (the search space of the module docstring)."""
    last = depth - 1
    scope = trial.suggest_categorical("scope", ["global", "per layer"])
    source = trial.suggest_float("source", 0.4 * last, 0.9 * last)
    project = trial.suggest_categorical("project", [True, False])
    norms = mode == "remove" and trial.suggest_categorical("norms", [True, False])
    profiles = {}
    peak_hi = 1.5 if mode == "remove" else 1.0
    for c in COMPONENTS if mode == "remove" else ("mlp",):
        profiles[c] = Profile(
            peak=trial.suggest_float(f"{c}.peak", 0.0, peak_hi),
            position=trial.suggest_float(f"{c}.position", 0.3 * last, 1.0 * last),
            floor=trial.suggest_float(f"{c}.floor", 0.0, 1.0),
            width=trial.suggest_float(f"{c}.width", 1.0, 0.8 * last),
        )
    off = Profile(0.0, 0.0, 0.0, 1.0)
    return Point(
        mode=mode,
        source=None if scope == "per layer" else source,
        project=project,
        attn=profiles.get("attn", off),
        mlp=profiles["mlp"],
        norms=norms,
    )


def classic(mode: str, depth: int) -> list[dict[str, Any]]:
    """The first trials: weight 1 everywhere, direction from 60 % of depth; in mode
    "remove" then the late ablation: each of the last 40 % of layers its own direction,
    projected off the harmless mean, weight 1, norms not kept."""
    last = depth - 1
    params: dict[str, Any] = {"scope": "global", "source": 0.6 * last, "project": False}
    for c in COMPONENTS if mode == "remove" else ("mlp",):
        params |= {
            f"{c}.peak": 1.0 if mode == "remove" else 0.5,
            f"{c}.position": 0.6 * last,
            f"{c}.floor": 1.0,
            f"{c}.width": 0.8 * last,
        }
    if mode != "remove":
        return [params]
    late = params | {"scope": "per layer", "project": True}
    for c in COMPONENTS:
        late |= {f"{c}.position": float(last), f"{c}.width": 0.4 * last}
    return [params | {"norms": False}, late | {"norms": False}]


def optimize(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    target_fit: Sequence[str],
    harmless_fit: Sequence[str],
    target_eval: Sequence[str],
    harmless_eval: Sequence[str],
    mode: str = "remove",
    trials: int = 50,
    startup: int | None = None,
    seed: int = 0,
    judge: Judge | None = None,
    max_new_tokens: int = 12,
    batch_size: int = 32,
    on_trial: Callable[[Trial], None] | None = None,
    goal: float | None = None,
) -> tuple[Study, Directions]:
    """Search `trials` points; directions come from the *_fit prompts, objectives from
    the *_eval prompts; `goal`: the behaviour share a trial must reach to count as
    feasible (module docstring)."""
    try:
        import optuna
    except ImportError:
        raise SteeringError(
            "steer optimize needs Optuna, which is not installed",
            hint="pip install 'weightops[search]' (or pip install optuna)",
        ) from None
    if mode not in MODES:
        raise SteeringError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
    if trials < 1:
        raise SteeringError(f"trials must be at least 1 (got {trials})")
    for what, ps in (("target", target_fit), ("harmless", harmless_fit)):
        if not ps:
            raise SteeringError(f"no {what} prompts to read the direction from")
    for what, ps in (("target", target_eval), ("harmless", harmless_eval)):
        if not ps:
            raise SteeringError(f"no {what} prompts to measure trials on")
    from weightops.steering.profile import check_family

    check_family(model)
    judge = judge or refusal_judge
    dirs = directions(model, tokenizer, target_fit, harmless_fit, head_view=mode == "remove")
    target_rows = prompt_ids(tokenizer, target_eval)
    harmless_rows = prompt_ids(tokenizer, harmless_eval)
    base_lp = first_token_logprobs(model, tokenizer, harmless_rows, batch_size)

    def behaviour_share() -> float:
        texts = greedy_completions(model, tokenizer, target_rows, max_new_tokens, batch_size)
        shown = sum(bool(judge(p, t)) for p, t in zip(target_eval, texts, strict=True))
        share = shown / len(texts)
        return share if mode == "remove" else 1.0 - share

    study = Study(mode=mode, depth=dirs.depth, baseline=behaviour_share())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Optuna 5 takes a trial's constraint from the objective (set_constraint) and
    # deprecates the sampler's constraints_func, which Optuna 4 needs.
    set_constraint = hasattr(optuna.trial.Trial, "set_constraint")
    constraints = None
    if goal is not None and not set_constraint:

        def constraints(trial: Any) -> list[float]:
            return [trial.user_attrs["behaviour"] - goal]

    sampler = optuna.samplers.TPESampler(
        n_startup_trials=startup if startup is not None else max(1, round(0.3 * trials)),
        multivariate=True,
        seed=seed,
        constraints_func=constraints,
    )
    search = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    for params in classic(mode, dirs.depth):
        search.enqueue_trial(params)

    def objective(trial: Any) -> tuple[float, float]:
        t0 = time.perf_counter()
        point = suggest(trial, mode, dirs.depth)
        with applied(model, point, dirs):
            kl = kl_divergence(
                base_lp, first_token_logprobs(model, tokenizer, harmless_rows, batch_size)
            )
            share = behaviour_share()
        trial.set_user_attr("behaviour", share)
        if goal is not None and set_constraint:
            trial.set_constraint("behaviour", share - goal)
        done = Trial(trial.number, point, share, kl, time.perf_counter() - t0)
        study.trials.append(done)
        if on_trial is not None:
            on_trial(done)
        return share, kl

    search.optimize(objective, n_trials=trials)
    return study, dirs


def front_table(study: Study, chosen: Trial | None = None) -> str:
    """The Pareto front as a Markdown table."""
    what = "behaviour" if study.mode == "remove" else "behaviour missing"
    lines = [
        f"| trial | {what} | KL | source | project | norms | attn peak@pos (floor, width) "
        "| mlp peak@pos (floor, width) |",
        "|---:|---:|---:|---|---|---|---|---|",
    ]
    for t in study.front():
        p = t.point
        src = "per layer" if p.source is None else f"{p.source:.2f}"

        def prof(q: Profile, used: bool) -> str:
            if not used:
                return "–"
            return f"{q.peak:.2f}@{q.position:.1f} ({q.floor:.2f}, {q.width:.1f})"

        mark = " ←" if chosen is not None and t.number == chosen.number else ""
        lines.append(
            f"| {t.number}{mark} | {t.behaviour:.1%} | {t.kl:.4f} | {src} | "
            f"{'yes' if p.project else 'no'} | "
            f"{('kept' if p.norms else 'no') if p.mode == 'remove' else '–'} | "
            f"{prof(p.attn, p.mode == 'remove')} | "
            f"{prof(p.mlp, True)} |"
        )
    return "\n".join(lines)
