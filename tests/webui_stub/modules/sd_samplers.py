"""The WebUI's sampler registry, as far as extensions read it: ``all_samplers``, ``samplers_hidden`` (from the
"Hide samplers in user interface" setting) and ``visible_sampler_names()``. The stand-in's samplers are the ones its
``process_images`` can run: our own."""

from collections import namedtuple

from lora_trainer.sampling.samplers import SAMPLERS

SamplerData = namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])

all_samplers = [SamplerData(name, None, [], {}) for name in SAMPLERS]
all_samplers_map = {x.name: x for x in all_samplers}
samplers = all_samplers
# lower-case names and aliases → names, as the WebUI's set_samplers() fills it (its API reads names through it)
samplers_map = {**{x.name.lower(): x.name for x in all_samplers}, "k_euler_a": "Euler a", "k_euler": "Euler"}
samplers_hidden: set[str] = set()


def visible_sampler_names():
    return [x.name for x in samplers if x.name not in samplers_hidden]


def visible_samplers():
    return [x for x in samplers if x.name not in samplers_hidden]
