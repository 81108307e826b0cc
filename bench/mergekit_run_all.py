"""Run recipes with mergekit, in mergekit's virtualenv, one process for all of them.

Usage: python mergekit_run_all.py JOBS.json RESULTS.json, where JOBS.json lists
[recipe path, output folder] pairs. Each result is {"ok": bool, "error": str}. Run by
bench/mergekit_parity.py with the peer virtualenv's python; imports only mergekit.
"""

from __future__ import annotations

import json
import sys

import torch
import yaml
from mergekit.architecture.base import ConfiguredModelArchitecture, ConfiguredModuleArchitecture
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge

# mergekit 0.1.4's pydantic models hold transformers configs, whose annotations name
# `torch` as a forward reference under transformers 5; without it in the namespace,
# every merge stops at planning. Resolving the name changes no arithmetic.
for _model in (ConfiguredModelArchitecture, ConfiguredModuleArchitecture):
    _model.model_rebuild(_types_namespace={"torch": torch})


def main() -> None:
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    results = {}
    for recipe, out in jobs:
        try:
            with open(recipe) as f:
                config = MergeConfiguration.model_validate(yaml.safe_load(f))
            # mergekit's random methods draw from torch's global generator.
            torch.manual_seed(0)
            run_merge(config, out_path=out, options=MergeOptions(quiet=True))
            results[recipe] = {"ok": True, "error": ""}
        except Exception as e:  # every failure is a result to report, not a crash
            msg = " ".join(str(e).split())
            results[recipe] = {"ok": False, "error": f"{type(e).__name__}: {msg}"[:300]}
    with open(sys.argv[2], "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
