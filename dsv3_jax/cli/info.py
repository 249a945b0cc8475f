"""`dsv3 info CONFIG`: a config's key fields and parameter counts (from abstract shapes; nothing allocated)."""

from __future__ import annotations

import argparse
import json
import os


def _config_from(spec: str):
    from dsv3_jax.config import PRESETS, ModelConfig
    from dsv3_jax.errors import ConfigError

    if spec in PRESETS:
        return ModelConfig.from_preset(spec)
    if os.path.exists(spec):
        try:
            return ModelConfig.from_hf_config(spec)
        except ConfigError as e:
            raise ConfigError(str(e) if spec in str(e) else f"{spec}: {e}") from None
    raise ConfigError(f"{spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a config path")


def cmd_info(args: argparse.Namespace) -> int:
    """Print a config's key fields and its parameter counts (from abstract shapes; nothing is allocated)."""
    from dsv3_jax.model.api import param_counts

    config = _config_from(args.config)
    counts = param_counts(config)
    if args.json:
        print(json.dumps({"config": config.to_hf_config(), "params": counts}, indent=2))
        return 0
    print(f"layers {config.num_hidden_layers} ({config.num_dense_layers} dense + {config.num_moe_layers} MoE), "
          f"hidden {config.hidden_size}, heads {config.num_attention_heads}, experts {config.n_routed_experts} "
          f"top-{config.num_experts_per_tok} ({config.n_group} groups keep {config.topk_group}), "
          f"MTP depth {config.num_nextn_predict_layers}")
    for key, value in counts.items():
        print(f"  {key:>6} parameters: {value:>18,}")
    return 0


def register(sub) -> None:
    info = sub.add_parser("info", help="config summary and parameter counts")
    info.add_argument("config", help="preset name, HF config.json, or HF checkpoint directory")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)
