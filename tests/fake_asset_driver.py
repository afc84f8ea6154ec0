"""Run by tests/test_concurrency.py under `accelerate launch`: the tiny model becomes a catalog asset
(a wheel in an empty cache), so every rank of the launch fetches it at start, as on a new machine."""

import sys
import time
from pathlib import Path

from peftkit import Config, Trainer, assets
from peftkit.hashing import sha256_file

model_dir, calls = Path(sys.argv[2]), Path(sys.argv[3])


def prepare(raw, out):
    with open(calls, "a") as f:
        f.write("prepared\n")
    time.sleep(1.0)  # the other rank arrives while this one works
    for member, path in raw.items():
        (out / Path(member).name).write_bytes(path.read_bytes())


members = {f"tinymodel/{p.name}": sha256_file(p) for p in sorted(model_dir.iterdir()) if p.is_file()}
assets.CATALOG["tiny-model"] = assets.Asset("tiny-model", "tinymodel", "1.0.0", members, prepare, "the tiny test model")
config = Config.from_yaml(sys.argv[1]).override(["--model.name_or_path=asset:tiny-model", *sys.argv[4:]])
trainer = Trainer(config, log=lambda _: None)
trainer.fit()
print(f"rank {trainer.accelerator.process_index} of {trainer.accelerator.num_processes} trained")
