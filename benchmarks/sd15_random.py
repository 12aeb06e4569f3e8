"""Write Stable Diffusion 1.5 and a ControlNet at their real shapes with random weights.

    python benchmarks/sd15_random.py --out /tmp/sd15-random --tokenizer work_dirs/toy/toy-sd15/tokenizer

Writes <out>/sd15 (runwayml/stable-diffusion-v1-5's folder layout: unet, vae, 12-layer text
encoder, tokenizer, DDPM scheduler, model_index.json) and <out>/controlnet (ControlNetModel
from that UNet, as lllyasviel's v1.1 models are shaped). Used to run the real launchers at
SD1.5's memory and compute cost where the weights cannot be downloaded (a GPU with no
network): `SD_PATH=<out>/sd15 CONTROLNET_PATH=<out>/controlnet train/reward_canny.sh`.
The weights are random, so the images are noise: this checks speed, memory and fp16
numerics of the pipeline, not quality.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: utils/
sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_step.py

import argparse  # noqa: E402
import shutil  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to write sd15/ and controlnet/ into.")
    parser.add_argument("--tokenizer", required=True,
                        help="a CLIPTokenizer folder (SD1.5's; `python -m toy.world` writes one in toy-sd15/tokenizer).")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)

    import torch
    from diffusers import ControlNetModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from train_step import build_models
    from toy.world import SD15_SCHEDULER_CONFIG  # SD1.5's scheduler config, as the toy world writes it
    from utils.io import save_json

    out = Path(options.out)
    sd = out / "sd15"
    parts = build_models(real_shapes=True, device="cpu", seed=options.seed)
    torch.manual_seed(options.seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(  # openai/clip-vit-large-patch14's text tower
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
    parts.unet.save_pretrained(sd / "unet")
    parts.vae.save_pretrained(sd / "vae")
    text_encoder.save_pretrained(sd / "text_encoder")
    shutil.copytree(options.tokenizer, sd / "tokenizer", dirs_exist_ok=True)
    save_json({"_class_name": "DDPMScheduler", **SD15_SCHEDULER_CONFIG}, sd / "scheduler" / "scheduler_config.json")
    save_json({
        "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, sd / "model_index.json")
    ControlNetModel.from_unet(parts.unet, conditioning_embedding_out_channels=(16, 32, 96, 256)).save_pretrained(
        out / "controlnet")
    print(f"wrote {sd} and {out / 'controlnet'}")


if __name__ == "__main__":
    main()
