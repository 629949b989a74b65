"""Generation as modules/processing.py runs it (the parts an extension sees): a processing dataclass and
process_images with the extra-network lifecycle. Sampling itself is our own txt2img on the loaded tiny model."""

import json
import random
from dataclasses import dataclass, field

from modules import extra_networks, shared


@dataclass(repr=False)
class StableDiffusionProcessing:
    sd_model: object = None
    outpath_samples: str = None
    outpath_grids: str = None
    prompt: str = ""
    prompt_for_display: str = None
    negative_prompt: str = ""
    styles: list = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    seed_enable_extras: bool = True
    sampler_name: str = None
    scheduler: str = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool = None
    tiling: bool = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    extra_generation_params: dict = None
    override_settings: dict = None
    override_settings_restore_afterwards: bool = True
    sampler_index: int = None
    refiner_checkpoint: str = None
    refiner_switch_at: float = None
    disable_extra_networks: bool = False
    scripts: object = None
    script_args: list = None

    def __post_init__(self):
        self.styles = self.styles or []
        self.extra_generation_params = self.extra_generation_params or {}
        self.override_settings = self.override_settings or {}
        self.iteration = 0
        self.is_hr_pass = False
        self.comments = {}

    def comment(self, text):
        self.comments[text] = 1

    def close(self):
        pass


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr: bool = False
    denoising_strength: float = 0.75
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str = None
    hr_sampler_name: str = None
    hr_scheduler: str = None
    hr_prompt: str = ''
    hr_negative_prompt: str = ''
    force_task_id: str = None
    hr_prompts: list = field(default=None, init=False)


class Processed:
    def __init__(self, p, images_list, seed=-1, info="", infotexts=None):
        self.images = images_list
        self.prompt = p.prompt
        self.negative_prompt = p.negative_prompt
        self.seed = seed
        self.info = info
        self.infotexts = infotexts or [info] * len(images_list)
        self.all_prompts = getattr(p, "all_prompts", [p.prompt])
        self.all_seeds = getattr(p, "all_seeds", [seed])
        self.width = p.width
        self.height = p.height


def _quote(text):
    text = str(text)
    if ',' not in text and '\n' not in text and ':' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def process_images(p):
    from lora_trainer.sampling.txt2img import GenerationSettings, txt2img

    model = shared.sd_model.stub_model
    seed = p.seed if p.seed is not None and p.seed >= 0 else random.randrange(2**32)
    count = p.batch_size * p.n_iter
    p.all_prompts = [p.prompt] * count
    p.all_negative_prompts = [p.negative_prompt] * count
    p.all_seeds = [seed + i for i in range(count)]
    p.all_subseeds = list(p.all_seeds)
    images, infotexts = [], []
    p.extra_network_data = {}
    if shared.state.job_count == -1:  # a caller that set it (the X/Y/Z plot) counts its own jobs
        shared.state.job_count = p.n_iter
    for n in range(p.n_iter):
        if shared.state.skipped:
            shared.state.skipped = False
        if shared.state.interrupted or shared.state.stopping_generation:
            break
        p.iteration = n
        p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
        p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
        p.seeds = p.all_seeds[n * p.batch_size:(n + 1) * p.batch_size]
        p.subseeds = p.seeds
        p.prompts, p.extra_network_data = extra_networks.parse_prompts(p.prompts)
        if not p.disable_extra_networks:
            extra_networks.activate(p, p.extra_network_data)
        model_info = {"Model hash": shared.sd_model.sd_model_hash,
                      "Model": shared.sd_model.sd_checkpoint_info.name_for_extra,
                      **{k: _quote(v) for k, v in p.extra_generation_params.items() if v is not None}}
        settings = GenerationSettings(prompt=p.prompts[0], negative_prompt=p.negative_prompts[0], steps=p.steps,
                                      sampler=p.sampler_name or "Euler a", cfg_scale=p.cfg_scale, seed=p.seeds[0],
                                      width=p.width, height=p.height, batch_size=p.batch_size)

        def progress(step, total):
            shared.state.sampling_step, shared.state.sampling_steps = step, total
            shared.total_tqdm.update()

        for generated in txt2img(model, settings, callback=progress, model_info=model_info):
            images.append(generated.image)
            infotexts.append(generated.infotext)
        shared.state.nextjob()
    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)
    return Processed(p, images, seed, infotexts[0] if infotexts else "", infotexts)
