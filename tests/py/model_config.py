#!/usr/bin/env python3
"""Print, as JSON, the model configuration mlx-vlm builds from a converted directory's config.json.

Follows mlx_vlm.utils.load_model's own steps (load_config, the model class's ModelConfig.from_dict,
update_module_configs, apply_generation_config_defaults) without loading weights, so two outputs can
be compared by what mlx-vlm actually reads rather than by their config.json spelling.

    python tests/py/model_config.py MODEL_DIR
"""

import dataclasses
import json
import sys
from pathlib import Path

from mlx_vlm import utils


def main() -> int:
    path = Path(sys.argv[1])
    config = utils.load_config(path)
    model_class, _ = utils.get_model_and_args(config=config, model_path=path)
    config.setdefault("text_config", config.pop("llm_config", {}))
    config.setdefault("vision_config", {})
    config.setdefault("audio_config", {})
    mc = model_class.ModelConfig.from_dict(config)
    mc = utils.update_module_configs(mc, model_class, config, ["text", "vision", "perceiver", "projector", "audio"])
    mc = utils.apply_generation_config_defaults(mc, config)
    out = dataclasses.asdict(mc) if dataclasses.is_dataclass(mc) else vars(mc)
    print(json.dumps(out, sort_keys=True, default=str, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
