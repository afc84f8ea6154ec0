"""peftkit: parameter-efficient fine-tuning that tells you whether it helped.

from peftkit import Config, Trainer
report = Trainer(Config(output_dir="runs/x")).fit()

PreferenceTrainer (train.objective=dpo: preference pairs, docs/alignment.md) takes the same arguments.
"""

from peftkit.callbacks import Callback
from peftkit.config import Config, DataConfig, EvalConfig, MethodConfig, ModelConfig, TrainConfig
from peftkit.errors import PeftkitError

__all__ = [
    "Callback",
    "Config",
    "DataConfig",
    "EvalConfig",
    "MethodConfig",
    "ModelConfig",
    "PeftkitError",
    "PreferenceTrainer",
    "TrainConfig",
    "Trainer",
]


def __getattr__(name):
    # Trainer pulls in torch, transformers and peft (~6 s); import it only when asked for.
    if name == "Trainer":
        from peftkit.trainer import Trainer

        return Trainer
    if name == "PreferenceTrainer":
        from peftkit.alignment.trainer import PreferenceTrainer

        return PreferenceTrainer
    raise AttributeError(name)
