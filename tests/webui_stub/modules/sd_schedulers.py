"""The WebUI's schedule types (1.9+): ``schedulers`` with their labels, as the "Schedule type" dropdown lists them.
The stand-in's ``process_images`` records ``p.scheduler`` but draws with the sampler alone."""

import dataclasses


@dataclasses.dataclass
class Scheduler:
    name: str
    label: str
    function: object = None
    default_rho: float = -1
    need_inner_model: bool = False
    aliases: list = None


schedulers = [Scheduler("automatic", "Automatic"), Scheduler("uniform", "Uniform"), Scheduler("karras", "Karras"),
              Scheduler("exponential", "Exponential"), Scheduler("polyexponential", "Polyexponential"),
              Scheduler("sgm_uniform", "SGM Uniform", aliases=["SGMUniform"])]
schedulers_map = {**{x.name: x for x in schedulers}, **{x.label: x for x in schedulers}}
