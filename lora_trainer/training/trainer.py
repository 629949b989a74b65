"""The training loop: a thin shell over the model code, the networks, the data plan and the pure step functions.

One ``train(options)`` call runs a whole job in the current process and reports through the event log; the
CLI, the UI and the API start it as a subprocess (``python -m lora_trainer.train_network``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import random
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..compat import DYNAMO_TRACES_SLOWLY, native_bf16, SCALES_LOSS_ON_CPU, GradScaler, OutOfMemoryError, autocast
from ..console import progress_bar
from ..dataset.config import DatasetGroupConfig
from ..dataset.images import ImageError
from ..dataset.layouts import caption_fallback_notes, dataset_images
from ..errors import UserError
from ..models.attention import set_attention_backend, xformers_installed, xformers_problem
from ..models.checkpoint import declared_prediction, detect_architecture, load_checkpoint, open_tensors
from ..models.fp8 import FP8, store_in_fp8
from ..models.prompt import prompt_problems
from ..models.tokenizer import CLIPTokenizer
from ..models.vae import vae_layout
from ..networks.activation import lora_calls_in
from ..networks.apply import Strength, merge_for_good
from ..networks.max_norm import apply_max_norm, left_alone_warning
from ..networks.files import read_network
from ..networks.network import LoRANetwork, create_network, network_from_file
from ..networks.spec import network_args_notes, spec_from_kohya
from ..process_memory import peak_rss_mib
from ..safe_io import HeldFile, windows_path_limits
from .distributed import World, agree_on_command, agree_on_seed, sum_across, sum_gradients, world_from_env
from .distributed import finish as finish_world
from .distributed import start as start_world
from . import noise as N
from .control import asks_to_stop, control_command, control_text, leftover_warning, written_before
from .data import (TrainingData, build_training_data, check_bucket_steps, check_captions_cacheable, sdxl_sizes,
                   unmarked_caches_warning)
from .evaluation import outlier_images, recommend_epoch, unkept_epoch, validation_generator, validation_timesteps
from .events import EventLog
from .lr_schedules import advance, make_scheduler, resolve_warmup
from .optimizers import (check_optimizer_importable, clip_grad_norm_, evaluating, is_schedule_free, make_optimizer,
                         optimizer_label, takes_its_own_step)
from .options import FIELDS, TrainOptions, join_command_line, memory_advice, non_default, prediction_problems
from .outputs import OutputPlan, RunMetadata
from ..sampling.samplers import is_stand_in, sampler_name
from .samples import draw_samples, not_read_warning, read_prompts
from .state import (load_sd_scripts_moments, load_sd_scripts_state, load_state, readable_state, save_state, saved_facts,
                    state_kind)
from .text import CaptionEncoding, TextEncoderCache, encode_captions, sdxl_vector
from .tracking import Tracker, require_tensorboard


def pick_device(name: str, world: World = World()) -> torch.device:
    if name == "auto":
        return torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: this PyTorch ({torch.__version__}) sees no CUDA GPU; install the CUDA build "
                        "of torch for your driver, or use --device cpu")
    if device.index is None:  # under torchrun each rank takes its own GPU, as with --device auto
        device = torch.device("cuda", world.local_rank)
    elif world.distributed:  # every rank on that one GPU: NCCL stops on "Duplicate GPU", or they share its memory
        raise UserError(f"--device {name} under torchrun would put all {world.size} processes on GPU {device.index}: "
                        "use --device cuda (each process takes the GPU of its LOCAL_RANK) and choose the GPUs with "
                        "CUDA_VISIBLE_DEVICES")
    if device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0; "
                        "use --device cuda or auto")
    return device


def check_before_queueing(options: TrainOptions, group: DatasetGroupConfig) -> list[str]:
    """What the trainer would refuse as it starts, found from headers and caption files alone, so that the job queue
    refuses it at once instead of hours later behind another job: a GPU this machine lacks, a file that is not an SD
    checkpoint (a LoRA, a VAE), --v2 on an SD1 file, a bucket step that model does not take, captions that vary under
    --cache_text_encoder_outputs, caption files it cannot read (not UTF-8, empty). ``group``: the job's datasets
    (``dataset_group``), read once by the caller. Returns what the run would warn of as it starts that the user may
    want to fix first (images without a caption file, when captions lie under another extension)."""
    try:
        pick_device(options.device)
    except UserError as error:
        raise UserError(str(error), "device") from None
    path = Path(options.pretrained_model_name_or_path)
    if path.suffix.lower() == ".safetensors":  # a header; a pickle (.ckpt) would have to be loaded whole
        try:
            source = open_tensors(path)
            config, _ = detect_architecture(source)
        except UserError as error:
            raise UserError(str(error), "pretrained_model_name_or_path") from None
        _check_model_matches_options(config, options)
        prediction, how = ("v_prediction", None) if options.v_parameterization else (
            declared_prediction(source, path) or (None, None))
        # an SD2 file that declares nothing is told apart by a test forward as it loads: checked then
        _check_prediction_matches_options(prediction or (None if config.name.startswith("sd2") else "epsilon"), options, how)
        check_bucket_steps(group, config)
    require_tensorboard(options.logging_dir)
    if options.cache_text_encoder_outputs:  # refused as the trainer starts, after the model has loaded
        check_captions_cacheable(subset.caption_options for dataset in group.datasets for subset in dataset.subsets)
    to_fix_first = []
    for dataset in group.datasets:
        try:
            images = dataset_images(dataset)
        except UserError as error:
            field = next(name for name in ("dataset_config", "in_json", "train_data_dir") if getattr(options, name))
            raise UserError(str(error), field) from None
        for subset in images.subsets:  # what the run would warn of as it starts, said as the job is submitted
            to_fix_first += caption_fallback_notes(subset.subset, subset.images, options.dataset_config)
    vae = Path(options.vae) if options.vae else None
    if vae is not None and vae.suffix.lower() == ".safetensors":
        try:
            keys = list(open_tensors(vae).shapes)
        except UserError as error:
            raise UserError(f"--vae {error}", "vae") from None
        if vae_layout(keys) is None:
            raise UserError(f"--vae {vae}: not a VAE ({len(keys)} tensors such as {sorted(keys)[0] if keys else 'none'}); "
                            "give a VAE file (such as sdxl_vae.safetensors) or leave --vae out", "vae")
    return to_fix_first


def check_precision(options: TrainOptions, device: torch.device) -> None:
    """bf16 needs an Ampere or newer GPU (a Colab T4 or an RTX 20xx has none), and fp16 needs loss scaling, which torch
    does on the CPU from 2.3 on (the WebUI's 2.1 has it for CUDA only): say so before loading anything."""
    if device.type == "cuda" and options.mixed_precision == "bf16" and not native_bf16():
        raise UserError(f"--mixed_precision bf16: {torch.cuda.get_device_name(device)} has no bf16 arithmetic; use "
                        "--mixed_precision fp16" + (" and drop --full_bf16" if options.full_bf16 else ""))
    if device.type == "cpu" and options.mixed_precision == "fp16" and not SCALES_LOSS_ON_CPU:
        raise UserError(f"--mixed_precision fp16 on the CPU: this PyTorch ({torch.__version__}) scales the loss on CUDA "
                        "only, and without it fp16 gradients round to zero; use --mixed_precision bf16 or no on the CPU")


DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class RunState:
    """What a resumed run needs besides the weights and the optimizer: where it is, and its random streams."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    batch_in_epoch: int = 0  # batches of the current epoch already trained
    losses: list[float] = field(default_factory=list)  # per step, for the running average
    epoch_train_loss: dict[int, float] = field(default_factory=dict)
    epoch_validation_loss: dict[int, float] = field(default_factory=dict)
    step_validation_loss: dict[int, float] = field(default_factory=dict)  # with --validate_every_n_steps
    per_image_loss: dict[str, list[float]] = field(default_factory=dict)
    first_step: int = 0  # the step before losses[0]: a run continued with --initial_step starts counting there
    # the step the current epoch began at: a resumed run's epochs may have had another length (another batch size)
    epoch_first_step: int | None = None

    @property
    def current_epoch(self) -> int:
        """The epoch this state is in, or has just finished, counted from 1: sd-scripts' ``current_epoch``, and the
        epoch the step events name."""
        return self.epoch + (1 if self.batch_in_epoch else 0)

    @classmethod
    def continuing(cls, initial_step: int, steps_per_epoch: int, accumulation: int, skip_batches: bool) -> RunState:
        """sd-scripts' ``--initial_step``/``--initial_epoch`` (a run continued from a network file, without a state):
        counting, file names and data order go on from that step. The data of the epoch it falls in is skipped up to
        it with ``--skip_until_initial_step``; without, the run starts at that epoch's beginning, as sd-scripts does."""
        epoch = initial_step // steps_per_epoch
        step = initial_step if skip_batches else epoch * steps_per_epoch
        return cls(epoch=epoch, step=step, batch_in_epoch=(step - epoch * steps_per_epoch) * accumulation, first_step=step)


def stop_signals() -> list[int]:
    """The signals that stop a run (finish the step, save): Ctrl-C, SIGTERM, and on Windows SIGBREAK, which Ctrl-Break
    sends and whose default ends the process without a save. (Closing the console window sends it too, but Windows
    ends the process a few seconds later whatever it does: too soon for a step and a save.)"""
    return [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGBREAK") if hasattr(signal, name)]


class StopRequest:
    """SIGINT/SIGTERM or the control file: finish the step, then act.

    The control file (``--stop_file``, written by the job runner) holds a word a line: ``stop`` or ``pause`` (or
    nothing) = save weights and state, exit 0; ``save`` = save now and go on; ``sample`` = draw the samples now and go
    on. A stop takes a save's place (it saves too); a sample written with it is drawn before the stop; save and sample
    both written within a step are both done. Another word is said through ``warn`` and not obeyed.
    """

    def __init__(self, stop_file: Path | None, warn: Callable[[str], None]):
        self.stop_file = stop_file
        self.warn = warn
        self.signalled = False
        self._obeyed: tuple[int, int] | None = None  # the control file read but not removable, by time and size
        self._previous = {}
        for sig in stop_signals():
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass

    def close(self) -> None:
        """Give the signals back: after the run, Ctrl-C interrupts the caller again."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, *_):
        self.signalled = True

    def command(self) -> str | None:
        """``stop``, ``save``, ``sample``, ``save+sample``, ``sample+stop`` or None; a command is taken (the file
        removed) when read: a stop left behind would stop the resumed run, and every later one with that name, after
        its first step."""
        if self.signalled:
            return "stop"
        text = self._take()
        if text is None:
            return None
        command, unknown = control_command(text)
        for word in unknown:
            self.warn(f"{self.stop_file}: {word!r} is not a control command (stop, pause, save or sample): not obeyed")
        return command

    def drop_leftover(self, started: float) -> None:
        """A command written before this run started (a pause pressed twice, a stop as the last run ended) is removed
        and said, not obeyed: it would stop this run after its first step."""
        try:
            if self.stop_file is None or not written_before(self.stop_file.stat().st_mtime, started):
                return
        except OSError:
            return
        text = self._take()
        if text is not None:
            self.warn(leftover_warning(self.stop_file, text))

    def _take(self) -> str | None:
        """The control file's words, the file removed; None without one. A file that cannot be removed (a folder
        without write access, a virus scanner holding it on Windows) is obeyed once, said, and then read again only
        when it changes."""
        if self.stop_file is None:
            return None
        try:
            stat = self.stop_file.stat()
            if (stat.st_mtime_ns, stat.st_size) == self._obeyed:
                return None
            text = control_text(self.stop_file.read_bytes()).strip()
        except OSError:
            return None
        try:
            self.stop_file.unlink(missing_ok=True)
        except OSError as error:
            self._obeyed = (stat.st_mtime_ns, stat.st_size)
            self.warn(f"{self.stop_file} could not be removed after it was read ({error.strerror or error}): its words "
                      "are obeyed once; give a control file in a folder this run may write to")
        return text


def park_text_encoders(encoders: list[torch.nn.Module], device: torch.device) -> None:
    """With their outputs cached the encoders are needed again only for samples: off the GPU, in fp32 — the WebUI's
    torch 2.1 has no half-precision layer norm or matrix product on the CPU, and every sample round failed there.
    fp8 weights (--fp8_base) stay fp8: their layers compute in the input's precision, and fp32 copies of SDXL's
    encoders would take 3.3 GB of RAM instead of 0.8."""
    if device.type == "cuda":
        for encoder in encoders:
            encoder.to("cpu")
            for tensor in itertools.chain(encoder.parameters(), encoder.buffers()):
                if tensor.is_floating_point() and tensor.dtype not in (torch.float32, FP8):
                    tensor.data = tensor.data.float()


@contextlib.contextmanager
def decoder_on(vae: torch.nn.Module, device: torch.device, parked: bool):
    """The VAE (its decoder: the encoder is freed once latents are cached) on ``device`` while samples decode, and
    back on the CPU after when ``parked``: between sample rounds it would only hold GPU memory, as sd-scripts too
    moves it off after caching."""
    if not parked:
        yield
        return
    vae.to(device)
    try:
        yield
    finally:
        vae.to("cpu")


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak GPU memory of the run, or the process's peak RSS on the CPU (None where the OS does not say)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    peak = peak_rss_mib()
    return None if peak is None else round(peak, 1)


class NetworkGradScaler(GradScaler):
    """Loss scaling that unscales fp16 gradients too: under --full_fp16 the network's own weights, so their
    gradients, are fp16, which torch's scaler refuses to unscale (sd-scripts patches accelerate's the same way).
    Without scaling, the fp16 UNet's backward pass rounds the small gradients of a LoRA to zero."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)


def _sample_warnings(options: TrainOptions, prompts: list) -> list[str]:
    """What a prompts file asks for and will not get: options not read, <lora:…> tags, no prompt, no time to draw."""
    path = options.sample_prompts
    warnings = []
    for number, prompt in enumerate(prompts, 1):
        if prompt.not_read:
            warnings.append(not_read_warning(path, number, prompt))
        warnings += prompt.read_partly
        if lora_calls_in(prompt.prompt)[1]:
            warnings.append(f"{path} prompt {number}: its <lora:…> tags are left out; a sample shows the base model "
                            "with the network being trained, and no other")
        for text, part in ((prompt.prompt, "prompt"), (prompt.negative_prompt, "negative prompt")):
            warnings += [f"{path} prompt {number}, {part}: {problem}" for problem in prompt_problems(text or "")]
    stand_ins = sorted({name for name in [options.sample_sampler] + [p.sampler for p in prompts] if name and is_stand_in(name)})
    if prompts and stand_ins:  # sd-scripts has samplers the WebUI's list has not
        warnings.append("samples are drawn with the closest sampler this trainer has: "
                        + ", ".join(f"{name} with {sampler_name(name)}" for name in stand_ins))
    timing = [f"--{name}" for name in ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first")
              if getattr(options, name)]
    if timing and not path:
        warnings.append(f"{' and '.join(timing)} without --sample_prompts: no samples are drawn; give a prompts file")
    if options.sample_every_n_steps and options.sample_every_n_epochs:
        warnings.append("--sample_every_n_steps and --sample_every_n_epochs: samples are drawn every "
                        f"{options.sample_every_n_epochs} epoch(s) only, as sd-scripts does (the steps setting is "
                        "left out); keep one of them")
    if path and not prompts:
        warnings.append(f"{path} holds no prompt: no samples are drawn")
    elif prompts and not (options.sample_every_n_steps or options.sample_every_n_epochs or options.sample_at_first):
        warnings.append("--sample_prompts without --sample_every_n_steps, --sample_every_n_epochs or --sample_at_first: "
                        "samples are drawn only when asked for (sample now)")
    return warnings


def caption_encoding(options: TrainOptions, config) -> CaptionEncoding:
    """How this run encodes captions; clip skip only on models that take it (not SDXL), so caches match either way."""
    clip_skip = (options.clip_skip or 1) if config.takes_clip_skip else 1
    return CaptionEncoding(clip_skip, options.max_token_length, options.weighted_captions)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(options: TrainOptions, events: EventLog, notes: list[str] = (), started: float | None = None) -> list[Path]:
    """Run the job; returns the files written (last one = the final network). ``notes`` (what reading the options
    left out) become warnings after the start event. ``started``: when the command began (now by default); a control
    word written before it is a leftover of an earlier run."""
    started = time.time() if started is None else started
    world = world_from_env()
    device = pick_device(options.device, world)
    start_world(world, device, options.ddp_timeout)
    try:
        return _train(options, events if world.is_main else EventLog(None), world, device, list(notes), started)
    except OutOfMemoryError as error:
        raise UserError(f"out of {device.type.upper()} memory ({str(error).splitlines()[0][:120]}); {memory_advice(options)}") from None
    except Exception as error:
        if options.torch_compile and type(error).__module__.startswith("torch._"):  # dynamo/inductor: compiling failed
            raise UserError(f"torch.compile with --dynamo_backend {options.dynamo_backend} failed "
                            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); try --dynamo_backend eager or "
                            "aot_eager, or drop --torch_compile") from error
        raise
    finally:
        finish_world(world)


def choose_attention(options: TrainOptions, device: torch.device) -> list[str]:
    """xformers' kernel when --xformers asks for it, else SDPA (--sdpa, and what --mem_eff_attn is for): never an
    installed xformers unasked, since a build that does not match the torch fails only at the first step. Asked for
    where it cannot run, it gives way to SDPA (the same attention) with a warning: many shared configs set it."""
    if options.xformers and not xformers_installed():
        set_attention_backend("sdpa")
        return ["--xformers: xformers is not installed, so attention uses SDPA (PyTorch's own kernel, as lean on "
                "torch 2); install the xformers build made for your torch to use it"]
    if options.xformers and device.type != "cuda":
        set_attention_backend("sdpa")
        return [f"--xformers on the {device.type.upper()}: xformers runs on CUDA only, so attention uses SDPA"]
    problem = xformers_problem(device) if options.xformers else None
    set_attention_backend("xformers" if options.xformers and not problem else "sdpa")
    if problem:
        return [f"--xformers: {problem}. Attention uses SDPA instead (PyTorch's own kernel, the same attention)"]
    return []


def compile_models(model, backend: str) -> None:
    """``--torch_compile``: the UNet and the text encoders compiled in place (their names and weights unchanged)."""
    import torch._dynamo

    available = torch._dynamo.list_backends(exclude_tags=())
    if backend not in available:
        offered = [name for name in FIELDS["dynamo_backend"].metadata["choices"] if name in available]
        raise UserError(f"--dynamo_backend {backend} is not available with this PyTorch; choose one of {', '.join(offered)}")
    for part in (model.unet, *model.text_encoders):
        part.compile(backend=backend)


def release_cached_memory(device: torch.device, options: TrainOptions) -> None:
    """Hand the blocks PyTorch keeps cached back to the driver after the big one-off allocations (VAE encoding,
    sampling), as sd-scripts does unless ``--highvram``: other programs on the card, the WebUI first, get them."""
    if device.type == "cuda" and not options.highvram:
        torch.cuda.empty_cache()


def _train(options: TrainOptions, events: EventLog, world: World, device: torch.device, notes: list[str],
           started: float) -> list[Path]:
    run = TrainingRun(options, events, world, device, notes, started)
    try:
        return run.train()
    finally:
        run.close()


class TrainingRun:
    """One job, from the checkpoint to the final file: the set-up in the order sd-scripts does it, then the loop and
    what it calls between steps (saves, samples, validation, control commands). The step itself is ``_training_step``."""

    def __init__(self, options: TrainOptions, events: EventLog, world: World, device: torch.device, notes: list[str],
                 started: float):
        if options.resume and (found := readable_state(Path(options.resume))) != Path(options.resume):
            notes.append(f"--resume {options.resume}: a save replacing it was cut off, so it is missing; resuming from "
                         f"the state it replaced, {found}")
            options = dataclasses.replace(options, resume=str(found))
        self.options, self.events, self.world, self.device = options, events, world, device
        # a resumed run draws its data in the order the interrupted one would have: with the seed it was saved with
        self.resumed_facts = saved_facts(Path(options.resume)) if options.resume else {}
        _check_resumed_optimizer(options, self.resumed_facts)
        # a state that does not record its optimizer (an earlier version's, sd-scripts') meets it at the first step
        self._optimizer_unproven = bool(options.resume) and "optimizer" not in self.resumed_facts
        seed = options.seed if options.seed is not None else self.resumed_facts.get("seed", random.randrange(2**32))
        self.seed = seed = agree_on_seed(world, seed)
        seed_everything(seed)
        self.weight_dtype = weight_dtype = DTYPES[options.mixed_precision] if device.type == "cuda" else torch.float32
        self.spec = spec_from_kohya(options.network_module or "networks.lora", options.network_dim, options.network_alpha,
                                    options.network_args, options.network_dropout)
        warnings = notes + _option_warnings(options, self.spec, device, weight_dtype)  # said right after the start event
        warmup = options.lr_warmup_steps
        if world.distributed and isinstance(warmup, int) and warmup >= 1:
            warnings.append(f"--lr_warmup_steps {warmup} counts optimizer steps here, whatever the number of processes; "
                            f"sd-scripts under accelerate on {world.size} GPUs ends it after {warmup / world.size:g} "
                            "(its scheduler steps once per process): give a fraction (0.05) to mean the same in both")
        check_precision(options, device)
        require_tensorboard(options.logging_dir)
        # the folders and names only, before the model loads (the epoch count, known later, does not change them)
        self.plan = OutputPlan(options)
        self.plan.check_path_lengths(windows_path_limits())
        if world.is_main and (removed := self.plan.remove_leftovers()):
            warnings.append(removed)
        self.started = time.time()

        check_optimizer_importable(options.optimizer)
        self.model, fp8_saved = _prepared_model(options, device, weight_dtype, warnings)
        self.config = config = self.model.config
        self.data = data = build_training_data(options, config, seed, world.size)
        data.check_cache_path_lengths(windows_path_limits())
        warnings += data.notes  # what the dataset left out (folders without repeats, unreadable images …)
        if long_captions := data.long_captions_note(CLIPTokenizer.default(), options.max_token_length or 75):
            warnings.append(long_captions)
        fixed_captions = data.fixed_captions() if options.cache_text_encoder_outputs else {}  # refused before the caching
        if options.zero_terminal_snr and config.prediction_type != "v_prediction":
            warnings.append("--zero_terminal_snr on an epsilon-prediction model: at the last timestep the input is pure "
                            "noise and the target equals it; the paper pairs it with --v_parameterization")
        events.emit("start", seed=seed, model=config.label, images=data.num_images, reg_images=data.num_reg_images,
                    batches_per_epoch=data.batches_per_epoch, device=str(device),
                    **({"validation_images": data.num_validation_images} if options.validation_split else {}),
                    options=non_default(options),
                    **({"processes": world.size, "global_batch": options.train_batch_size * world.size}
                       if world.distributed else {}),
                    **({"fp8_saved_mib": round(fp8_saved / 2**20, 1)} if options.fp8_base or options.fp8_base_unet else {}))
        self._warn(warnings)
        data.cache_latents(self.model.vae, device, events)
        # every latent is ready: free the encoder, and park the decoder off the GPU until samples need it (sd-scripts
        # moves the whole VAE off the GPU)
        self.vae_parked = options.cache_latents and device.type == "cuda"
        if options.cache_latents:
            self.model.vae.encoder = None
        if self.vae_parked:
            self.model.vae.to("cpu")
        release_cached_memory(device, options)

        te_lr = (options.text_encoder_lr or [None])[0]
        self.train_te = not options.network_train_unet_only and te_lr != 0
        network_notes: list[str] = []
        self.network = network = _prepared_network(options, self.model, self.spec, self.train_te, device, weight_dtype,
                                                   network_notes)
        self.spec = network.spec  # --dim_from_weights: the file's rank and alpha
        if self.train_te and len(options.text_encoder_lr or []) > 1:
            network_notes.append(f"--text_encoder_lr {' '.join(f'{r:g}' for r in options.text_encoder_lr)}: every text "
                                 f"encoder trains at the first rate, {te_lr:g}, as sd-scripts' networks.lora trains them "
                                 "(it takes one rate); the others are not used")
        self._warn(network_notes)
        if options.torch_compile and options.dynamo_backend != "no":  # after the hooks, so the graphs include them
            compile_models(self.model, options.dynamo_backend)

        self.steps_per_epoch = math.ceil(data.batches_per_epoch / options.gradient_accumulation_steps)
        self.total_steps = (options.max_train_epochs * self.steps_per_epoch if options.max_train_epochs
                            else options.max_train_steps)
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        groups = network.parameter_groups(options.learning_rate, te_lr, options.unet_lr)
        self.trainable = [p for g in groups for p in g["params"]]
        self.optimizer = make_optimizer(options.optimizer, groups, options.learning_rate, options.optimizer_args or [])
        self.scheduler = make_scheduler(self.optimizer, options.lr_scheduler, self.total_steps,
                                        resolve_warmup(options.lr_warmup_steps, self.total_steps),
                                        num_cycles=options.lr_scheduler_num_cycles, power=options.lr_scheduler_power,
                                        min_lr_ratio=options.lr_scheduler_min_lr_ratio,
                                        scheduler_type=options.lr_scheduler_type, scheduler_args=options.lr_scheduler_args,
                                        decay=options.lr_decay_steps, timescale=options.lr_scheduler_timescale)
        self.generator = torch.Generator().manual_seed(seed)
        # fp16 gradients underflow without loss scaling (bf16 and fp32 do not need it): a no-op elsewhere
        self.scaler = NetworkGradScaler(device.type, enabled=weight_dtype == torch.float16)
        asked_alphas = _alphas(network)
        self.state = self._starting_state()
        self.spec = network.spec = _spec_with_loaded_alpha(options, network, asked_alphas, events)
        if is_schedule_free(options.optimizer):  # a state holds the weights as they are used: back to training ones
            self.optimizer.train()

        self.plan.num_epochs = self.num_epochs
        self.metadata = RunMetadata(options, config, self.model, self.spec, data, seed, self.started,
                                    optimizer_label(self.optimizer, options.optimizer_args), self.num_epochs,
                                    self.total_steps)
        self.tokenizer = CLIPTokenizer.default()
        self.text_cache = self._text_cache(fixed_captions) if options.cache_text_encoder_outputs else None
        self.prompts = read_prompts(options.sample_prompts, config.resolution) if options.sample_prompts else []
        self._warn(_sample_warnings(options, self.prompts))
        self.written: list[Path] = []
        self._losses_since_step: list[str] = []  # images whose loss was recorded since the last optimizer step
        self.tracker = Tracker(options.logging_dir if world.is_main else None, options.log_prefix, options.log_tracker_name)
        self.stop = StopRequest(self.plan.stop_file, lambda message: self._warn([message]))
        if world.is_main:  # the one rank that reads the control file
            self.stop.drop_leftover(started)
        self.progress = progress_bar(self.total_steps, "step", initial=self.state.step)
        self._step_losses: list[float] = []  # each batch's mean loss over every rank, since the last optimizer step
        self._last_time = time.perf_counter()

    def close(self) -> None:
        self.progress.close()
        self.tracker.close()
        self.stop.close()

    # --- set-up ----------------------------------------------------------------------------------------------

    def _starting_state(self) -> RunState:
        """Step 0, a state of ours (exactly where it stopped), or a step to go on from: sd-scripts' state folder,
        ``--initial_step``/``--initial_epoch``."""
        options, events = self.options, self.events
        initial_step, initial_from = None, ""
        moments_not_read = None
        if options.resume and state_kind(Path(options.resume)) == "sd-scripts":
            initial_step = load_sd_scripts_state(Path(options.resume), self.network)
            moments_not_read = load_sd_scripts_moments(Path(options.resume), self.network, self.optimizer)
            initial_from = f"--resume {options.resume} (at step {initial_step})"
        elif options.resume:
            asked = _learning_rates(self.optimizer)
            state, later = load_state(Path(options.resume), self.network, self.optimizer, self.scheduler, self.generator)
            if state.step >= self.total_steps:  # else "finished" at once, its weights saved as if trained to this end
                raise UserError(f"--resume {options.resume} (at step {state.step}, epoch {state.current_epoch}) leaves "
                                f"nothing to train: this run has {self.total_steps} steps ({self.num_epochs} epochs of "
                                f"{self.steps_per_epoch}); raise --max_train_epochs/--max_train_steps")
            events.emit("state", action="resumed", path=options.resume, epoch=state.current_epoch, step=state.step)
            if later:
                events.emit("warning", message=f"--resume {options.resume} was saved by a later version of this trainer: "
                            f"what it recorded of {', '.join(later)} is not read here, so its epoch's figures may be off; "
                            "update the extension to resume it exactly")
            if not self.resumed_facts:  # its data order and schedule follow from what this command says
                events.emit("warning", message=f"--resume {options.resume} was saved by an earlier version of this "
                            "trainer, which did not record its seed, optimizer or accumulation: give the same --seed, "
                            "--optimizer_type and --gradient_accumulation_steps it was trained with, or the run goes on "
                            "with another data order, or stops at its first step")
            self._warn(self._resumed_differently(state.step))
            if (saved := _learning_rates(self.optimizer)) != asked:  # the state's optimizer and schedule replace ours
                events.emit("warning", message=f"--resume {options.resume} goes on at the learning rates it was saved "
                            f"with ({', '.join(f'{lr:g}' for lr in saved)}), not this command's "
                            f"({', '.join(f'{lr:g}' for lr in asked)}), as sd-scripts does; to train on at other rates, "
                            f"start from its network: --network_weights {Path(options.resume) / 'model.safetensors'}")
            return state
        elif options.initial_step is not None or options.initial_epoch is not None:
            initial_step = (options.initial_step if options.initial_step is not None
                            else (options.initial_epoch - 1) * self.steps_per_epoch)
            initial_from = f"--initial_step {initial_step}"
        if initial_step is None:
            return RunState()
        if initial_step >= self.total_steps:
            raise UserError(f"{initial_from} leaves nothing to train: the run has {self.total_steps} steps "
                            f"({self.num_epochs} epochs of {self.steps_per_epoch}); raise --max_train_epochs/--max_train_steps")
        state = RunState.continuing(initial_step, self.steps_per_epoch, options.gradient_accumulation_steps,
                                    options.skip_until_initial_step)
        if options.resume:  # sd-scripts' state: its weights and step count, our own schedule
            advance(self.scheduler, state.step)
            events.emit("state", action="resumed", path=options.resume, epoch=state.current_epoch, step=state.step)
            moments = ("its optimizer moments too (optimizer.bin)" if moments_not_read is None else
                       f"not its optimizer moments, so the optimizer starts afresh: {moments_not_read}")
            events.emit("warning", message=f"{options.resume} is sd-scripts' state: its network and step count "
                        f"({initial_step}) are read, and {moments}; the run goes on from step {state.step} (the start "
                        "of its epoch unless --skip_until_initial_step) with the learning-rate schedule there; its "
                        "random states (random_states_*.pkl, pickles) are not read")
        return state

    def _facts(self) -> dict[str, int | str]:
        """What fixes this run's data order, and its optimizer: kept in its states."""
        return {"seed": self.seed, "images": self.data.num_images, "batches_per_epoch": self.data.batches_per_epoch,
                "optimizer": self.options.optimizer, "resolution": self.options.resolution or "",
                "gradient_accumulation_steps": self.options.gradient_accumulation_steps,
                "lr_scheduler": self.options.lr_scheduler, "total_steps": self.total_steps,
                "processes": self.world.size, "train_batch_size": self.options.train_batch_size}

    def _resumed_differently(self, step: int) -> list[str]:
        """Why a resumed run will not end as the interrupted one would have: another seed, dataset or batch size."""
        saved, now = self.resumed_facts, self._facts()
        names = {"seed": "--seed", "images": "images", "batches_per_epoch": "batches per epoch",
                 "resolution": "--resolution"}  # another accumulation is refused before
        changed = [f"{names[key]} {saved[key]} then, {now[key]} now" for key in names
                   if key in saved and saved[key] != now[key]]
        if changed and {"processes", "train_batch_size"} <= saved.keys():  # a torchrun state resumed otherwise, or back
            was, now_global = saved["processes"] * saved["train_batch_size"], now["processes"] * now["train_batch_size"]
            if was != now_global and was % now["processes"] == 0:
                changed.append(f"{saved['processes']} process(es) × batch {saved['train_batch_size']} then: with "
                               f"{now['processes']} process(es) give --train_batch_size {was // now['processes']}")
        said = [] if not changed else [
            f"--resume {self.options.resume} was saved by a run with other data or options ({'; '.join(changed)}): it "
            "goes on from its step, but its epochs are not the batches the interrupted run would have trained; resume "
            "with the same dataset, options and --seed (or none) to continue it exactly"]
        schedule = {key: saved[key] for key in ("lr_scheduler", "total_steps") if key in saved}
        if schedule and schedule != {key: now[key] for key in schedule} and not (
                saved.get("lr_scheduler") == now["lr_scheduler"] == "constant"):  # a constant rate has no length
            said.append(f"--resume {self.options.resume}: the learning-rate schedule was {saved.get('lr_scheduler', '?')} "
                        f"over {saved.get('total_steps', '?')} steps, and is {now['lr_scheduler']} over "
                        f"{now['total_steps']} now: the rate goes on from where the new schedule is at step "
                        f"{step}, not from where it was")
        return said

    def _text_cache(self, fixed_captions: dict) -> TextEncoderCache:
        text_cache = TextEncoderCache(self.config)
        text_cache.fill(self.model.text_encoders, fixed_captions, self.tokenizer,
                        caption_encoding(self.options, self.config), self.options.cache_text_encoder_outputs_to_disk)
        if text_cache.unmarked:
            self.events.emit("warning", message=unmarked_caches_warning(text_cache.unmarked, "text encoder output",
                                                                       "checkpoint or its text encoders"))
        park_text_encoders(self.model.text_encoders, self.device)
        return text_cache

    # --- the loop --------------------------------------------------------------------------------------------

    def train(self) -> list[Path]:
        options, state, data = self.options, self.state, self.data
        if options.sample_at_first:  # a resumed run too, as sd-scripts draws it (named e000000 there too)
            self.sample(0, state.step)
        self._at_last_step = self.generator.get_state()  # what an unreadable image rolls back to (see below)
        for epoch in range(state.epoch, self.num_epochs):
            batches = data.epoch_batches(epoch)
            resumed_at = state.batch_in_epoch  # resumed mid-epoch: the batches before it were trained before
            if not resumed_at:
                state.epoch_first_step = state.step
            try:
                for index, batch in enumerate(data.loaded(batches[resumed_at:], options.max_data_loader_n_workers),
                                              resumed_at):
                    self._learn(batch, epoch)
                    state.batch_in_epoch = index + 1
                    if (index + 1) % options.gradient_accumulation_steps != 0 and index + 1 != len(batches):
                        continue
                    self._step(epoch)
                    self._at_last_step, self._losses_since_step = self.generator.get_state(), []
                    if state.step >= self.total_steps:
                        break
                    if asks_to_stop(self._obey(epoch)):  # the file counts the epoch it stopped in, from 1, as a step save does
                        return self.finish(epoch + 1, stopped=True)
            except ImageError as error:
                self._stop_at_unreadable_image(error, epoch)
            self._end_epoch(epoch)
            if state.step >= self.total_steps:
                break
        return self.finish(state.epoch)

    def _stop_at_unreadable_image(self, error: ImageError, epoch: int) -> None:
        """An image deleted or damaged while the run reads it (without cached latents): what was trained so far is
        saved, as a stop saves it, before the error ends the run — up to an epoch of work would be lost otherwise."""
        state = self.state
        # back to the last whole step: a part-accumulated one is trained again on resuming, with the same draws
        state.batch_in_epoch -= state.batch_in_epoch % self.options.gradient_accumulation_steps
        self.optimizer.zero_grad(set_to_none=True)
        self.generator.set_state(self._at_last_step)
        for path in self._losses_since_step:
            state.per_image_loss[path].pop()
        if state.step == state.first_step:
            raise error
        if not self.world.is_main:  # the others read it (a copy of the data per node): only rank 0 saves, and it did not
            raise UserError(f"{error} (process {self.world.rank} of {self.world.size}; the others read it) Training "
                            f"stopped at step {state.step}; nothing was saved at this step: continue from the last "
                            "saved state once every process reads the same images") from None
        state.epoch = epoch
        weights, resumable = self.plan.step_path(state.step), self.plan.state_path(None, state.step)
        self.save_network_file(weights, epoch, state.step)
        self.save_state_file(resumable, stopped=True)
        raise UserError(f"{error} Training stopped at step {state.step}; what it learnt is saved in {weights.name}, and "
                        f"a state in {resumable}: fix or remove the image, then continue with --resume {resumable}") from None

    def _learn(self, batch, epoch: int) -> None:
        """Forward and backward on this rank's rows of ``batch``; every rank's per-image losses are recorded."""
        options, world = self.options, self.world
        rows = world.shard(len(batch.records))
        self.network.set_multiplier(self.data.network_multiplier(batch))
        per_sample = _training_step(batch, epoch, self.state.step, self.total_steps, self.model, self.config, self.network,
                                    options, self.tokenizer, self.config.schedule.alphas_cumprod, self.v_prediction,
                                    self.generator, self.device, self.weight_dtype, self.data, self.train_te, rows,
                                    self.text_cache)
        # this rank's share of the global batch mean: summed over ranks, the gradients are the mean's
        if per_sample.numel():  # a short last batch may leave a rank without rows
            self.scaler.scale(per_sample.sum() / (len(batch.records) * options.gradient_accumulation_steps)).backward()
        every_sample = torch.zeros(len(batch.records))
        every_sample[rows] = per_sample.detach().float().cpu()
        every_sample = sum_across(world, every_sample)
        self._step_losses.append(float(every_sample.mean()))
        for record, value in zip(batch.records, every_sample.tolist()):
            self.state.per_image_loss.setdefault(str(record.path), []).append(value)
            self._losses_since_step.append(str(record.path))

    def _optimizer_step(self) -> None:
        """The optimizer's step; the first after a resume said as a sentence where the state's moments or settings do
        not fit the optimizer (a state saved before states recorded their optimizer is not refused before loading)."""
        if not self._optimizer_unproven:
            self.scaler.step(self.optimizer)
            return
        self._optimizer_unproven = False
        try:
            self.scaler.step(self.optimizer)
        except OutOfMemoryError:
            raise  # said with the memory options, as at any step
        except (KeyError, RuntimeError, ValueError, TypeError) as error:
            resume = self.options.resume
            raise UserError(f"--resume {resume}: its optimizer state does not fit --optimizer_type "
                            f"{self.options.optimizer} ({type(error).__name__}: {error}); resume with the optimizer it "
                            f"was saved with, or start afresh from its network with --network_weights "
                            f"{Path(resume) / 'model.safetensors'}") from error

    def _step(self, epoch: int) -> None:
        """The optimizer step, its reports, and what falls due at this step (a step file, validation, samples)."""
        options, state, optimizer = self.options, self.state, self.optimizer
        sum_gradients(self.world, self.trainable)
        self.scaler.unscale_(optimizer)
        if options.max_grad_norm:
            clip_grad_norm_(self.optimizer, self.trainable, options.max_grad_norm)
        self._optimizer_step()
        self.scaler.update()
        self.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        norms = apply_max_norm(self.network.values(), options.scale_weight_norms) if options.scale_weight_norms else None
        # every batch the step accumulated counts, as sd-scripts records each batch (the last alone hid N-1 of N)
        value, self._step_losses = sum(self._step_losses) / len(self._step_losses), []
        if not math.isfinite(value):
            self._stop_diverged(f"the loss became {value}")
        state.losses.append(value)
        now = time.perf_counter()
        window = state.losses[-self.steps_per_epoch:]  # the last epoch's worth, as sd-scripts' running average
        average = sum(window) / len(window)
        self.progress.update(1)
        self.progress.set_postfix(epoch=epoch + 1, avr_loss=f"{average:.4f}")
        rates = group_rates(optimizer)
        self.tracker.step(state.step, value, average, rates, norms, adapted_rates(optimizer))
        self.events.emit("step", step=state.step, total=self.total_steps, epoch=epoch + 1, loss=value, average=average,
                         lr=part_rates(rates), **({"lr_groups": rates} if set(rates) - {"textencoder", "unet"} else {}),
                         seconds=round(now - self._last_time, 4),
                         memory_mib=peak_memory_mib(self.device),
                         **({"keys_scaled": norms.keys_scaled, "average_key_norm": round(norms.average_norm, 5),
                             "max_key_norm": round(norms.max_norm, 5)} if norms else {}))
        self._last_time = now
        if self.plan.save_at_step(state.step):  # a step file counts the epochs completed (ss_epoch), as sd-scripts'
            self.save_network_file(self.plan.step_path(state.step), epoch, state.step)
            if options.save_state:
                state.epoch = epoch  # the state is inside this epoch, at batch_in_epoch
                self.save_state_file(self.plan.state_path(None, state.step))
            self._warn(self.plan.prune_steps(state.step))
        self.validate_at_step(state.step)
        every = options.sample_every_n_steps
        if every and not options.sample_every_n_epochs and state.step % every == 0:
            self.sample(None, state.step)

    def _obey(self, epoch: int) -> str | None:
        """Carries out a control command (the control file, a signal), agreed by every rank; returns it."""
        state, plan = self.state, self.plan
        command = agree_on_command(self.world, self.stop.command() if self.world.is_main else None, self.stop.signalled)
        asked = (command or "").split("+")
        if "sample" in asked:
            if not self.prompts:
                self.events.emit("warning", message="sample: this run has no sample prompts (--sample_prompts); "
                                 "nothing was drawn")
            self.sample(None, state.step)
        if "save" in asked:
            self.save_network_file(plan.step_path(state.step), epoch, state.step)
            state.epoch = epoch
            self.save_state_file(plan.state_path(None, state.step))
        if "stop" in asked:
            state.epoch = epoch
            self.save_state_file(plan.state_path(epoch, state.step), stopped=True)
        return command

    def _end_epoch(self, epoch: int) -> None:
        options, state, plan = self.options, self.state, self.plan
        done = epoch + 1
        state.epoch, state.batch_in_epoch = done, 0
        # from the whole history, so an epoch resumed part-way still averages all of its steps
        began = state.epoch_first_step if state.epoch_first_step is not None else epoch * self.steps_per_epoch
        this_epoch = state.losses[max(0, began - state.first_step) : state.step - state.first_step]
        state.epoch_train_loss[done] = sum(this_epoch) / max(1, len(this_epoch))
        self.events.emit("epoch", epoch=done, average=state.epoch_train_loss[done], step=state.step)
        self.validate(done)
        self.tracker.epoch(done, state.epoch_train_loss[done], state.epoch_validation_loss.get(done))
        if options.sample_every_n_epochs and done % options.sample_every_n_epochs == 0:
            self.sample(done, state.step)
        if plan.save_at_epoch(done):
            self.save_network_file(plan.epoch_path(done), done, state.step)
            self._warn(plan.prune_epochs(done))
            if options.save_state:
                self.save_state_file(plan.state_path(done, None))

    def _warn(self, messages: list[str]) -> None:
        for message in messages:
            self.events.emit("warning", message=message)

    def finish(self, epoch: int, stopped: bool = False) -> list[Path]:
        """The final file (and state): at the last step, or where a stop or pause cut the run short (``stopped``)."""
        state, options = self.state, self.options
        self.save_network_file(self.plan.final_path(), epoch, state.step)
        if (options.save_state or options.save_state_on_train_end) and not stopped:  # a stop saved its state already
            self.save_state_file(self.plan.state_path(None, None))
        self.network.remove()
        self.progress.close()  # the summary below stands under the finished bar, not above a redrawn one
        epochs = sorted(state.epoch_train_loss)
        advice = recommend_epoch([state.epoch_train_loss[e] for e in epochs],
                                 [state.epoch_validation_loss.get(e) for e in epochs], epochs, self._no_validation())
        reason = advice and advice.reason
        if advice and not (self.plan.epoch_path(advice.epoch).exists() or advice.epoch == epoch and not stopped):
            reason += f"; {unkept_epoch(advice.epoch)}"
        self.events.emit("end", files=[str(p) for p in self.written if p.exists()], steps=state.step, epochs=epoch,
                         stopped=stopped, seconds=round(time.time() - self.started, 2),
                         recommended_epoch=advice.epoch if advice else None, reason=reason,
                         highest_loss_images=outlier_images(state.per_image_loss))
        return self.written

    def _no_validation(self) -> str:
        """Why an epoch has no validation loss to judge it by, in the recommendation's words."""
        if not self.options.validation_split:
            return "no validation split"
        if not self.data.validation:
            return f"--validation_split {self.options.validation_split} held out no image"
        return f"validation never ran on an epoch (every {self.options.validate_every_n_epochs} epochs)"

    # --- between steps ---------------------------------------------------------------------------------------

    @property
    def v_prediction(self) -> bool:
        return self.config.prediction_type == "v_prediction"

    def sample(self, epoch: int | None, step: int) -> None:
        if not self.prompts:
            return
        with evaluating(self.optimizer):  # every rank: a schedule-free optimizer's weights as they are used
            if self.world.is_main:
                self._draw_samples(epoch, step)
        release_cached_memory(self.device, self.options)

    def _draw_samples(self, epoch: int | None, step: int) -> None:
        def failed(number: int, error: Exception) -> None:  # a sample shows the training; it is never worth the training
            self.events.emit("warning", message=f"sample prompt {number} at step {step} failed ({type(error).__name__}: "
                             f"{error}); training goes on, the other prompts are drawn")

        self.network.eval().set_multiplier(1.0)
        try:
            with decoder_on(self.model.vae, self.device, self.vae_parked):
                draw_samples(self.model, self.prompts, self.options.sample_sampler, self.plan.sample_folder,
                             self.options.output_name, epoch, step, self.options.clip_skip or 1, failed,
                             lambda path: self.events.emit("sample", path=str(path), epoch=epoch, step=step))
        finally:
            self.network.train()

    def validation_loss(self) -> float:
        self.network.eval().set_multiplier(1.0)
        loss = _validation_loss(self.data, self.model, self.config, self.options, self.tokenizer,
                                self.config.schedule.alphas_cumprod, self.v_prediction, self.device, self.weight_dtype,
                                self.text_cache, total_steps=self.total_steps)
        self.network.train()
        return loss

    def validate(self, epoch: int) -> None:
        every = self.options.validate_every_n_epochs or 1
        if not self.data.validation or epoch % every:
            return
        with evaluating(self.optimizer):  # on every rank, the same weights after it
            if self.world.is_main:
                self.state.epoch_validation_loss[epoch] = loss = self.validation_loss()
                self.events.emit("validation", epoch=epoch, step=self.state.step, loss=loss)

    def validate_at_step(self, step: int) -> None:
        every = self.options.validate_every_n_steps
        if not every or not self.data.validation or step % every:
            return
        with evaluating(self.optimizer):  # on every rank, the same weights after it
            if self.world.is_main:
                self.state.step_validation_loss[step] = loss = self.validation_loss()
                window = self.state.losses[-self.steps_per_epoch:]
                self.tracker.step_validation(step, loss, sum(window) / max(1, len(window)))
                self.events.emit("validation", step=step, loss=loss)

    def judgement(self) -> dict[str, str]:
        """What the files record about how the run went (our key; sd-scripts' readers ignore it)."""
        state = self.state
        return {"lora_trainer.losses": json.dumps({"epoch_training_loss": state.epoch_train_loss,
                                                     "epoch_validation_loss": state.epoch_validation_loss,
                                                     "step_validation_loss": state.step_validation_loss,
                                                     "highest_loss_images": [
                                                         (_shared_name(path), loss)
                                                         for path, loss in outlier_images(state.per_image_loss)]})}

    def _stop_diverged(self, what: str) -> None:
        self.network.remove()
        raise UserError(f"{what} at step {self.state.step}: lower the learning rate or use fp32/bf16; stopped, and the "
                        "files saved before it are intact")

    def _check_finite_weights(self) -> None:
        """Before a save: an overflowing gradient can make the weights infinite while the step's loss (computed before
        it) was finite, and the loss check would only stop the run after this file had replaced a good one."""
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.trainable]).all()):  # one sync for them all
            self._stop_diverged("the network's weights became infinite or NaN (the loss was still finite)")

    def save_state_file(self, path: Path, stopped: bool = False) -> None:
        """``stopped``: saved because the run was asked to stop (or pause), to be resumed from."""
        self._check_finite_weights()
        with evaluating(self.optimizer):  # a schedule-free optimizer's weights as they are used
            if not self.world.is_main:
                return
            with _writing(path):
                try:
                    save_state(path, self.network, self.optimizer, self.scheduler, self.generator, self.state,
                               self._facts())
                except HeldFile as held:
                    if stopped:  # the state this stop was to be resumed from: not a thing to train on without
                        raise
                    self.events.emit("warning", message=f"{held}; the run goes on")
                    return
            self.events.emit("state", action="saved", path=str(path), epoch=self.state.current_epoch, step=self.state.step,
                             **({"stopped": True} if stopped else {}))

    def save_network_file(self, path: Path, epoch: int, step: int) -> None:
        self._check_finite_weights()
        with evaluating(self.optimizer):  # a schedule-free optimizer's weights as they are used
            if not self.world.is_main:
                return
            metadata = self.metadata.build(epoch, step, self.judgement())
            with _writing(path):
                try:
                    saved = self.plan.save(self.network, path, metadata)
                except HeldFile as held:  # the run's weights must not be lost to a file the WebUI keeps open
                    saved = self.plan.save(self.network, _free_name_beside(path), metadata)
                    self.events.emit("warning", message=f"{held} Saved as {saved.name} instead: rename it once that "
                                     "program lets go of the file")
            self.written.append(saved)
            self.events.emit("saved", path=str(saved), epoch=epoch, step=step)


def _option_warnings(options: TrainOptions, spec, device: torch.device, weight_dtype: torch.dtype) -> list[str]:
    """What the options ask for that this run does otherwise, or not at all; chooses the attention kernel."""
    warnings = [f"--{name} has no effect here: {f.metadata['inert']}" for name, f in FIELDS.items()
                if f.metadata["inert"] and getattr(options, name)]
    rates = [rate for rate in (options.unet_lr, *(options.text_encoder_lr or []), options.learning_rate) if rate]
    if any(kind in options.optimizer.lower() for kind in ("dadapt", "prodigy")) and rates and max(rates) <= 0.1:
        warnings.append(f"--optimizer_type {options.optimizer} finds its own step size and takes the learning rate as a "
                        f"factor on it: at {max(rates):g} it hardly learns; give 1.0 (as sd-scripts advises)")
    warnings += network_args_notes(spec)
    if options.scale_weight_norms and (left_alone := left_alone_warning(spec.algorithms, spec.train_norm)):
        warnings.append(left_alone)
    conv_alpha = dict(spec.network_args).get("conv_alpha") if options.network_module == "networks.dylora" else None
    if conv_alpha is not None and float(conv_alpha) != spec.alpha:
        warnings.append(f"conv_alpha={conv_alpha}: networks.dylora trains its convolutions at --network_alpha "
                        f"{spec.alpha:g}, as sd-scripts' DyLoRA does (it reads no conv_alpha)")
    if takes_its_own_step(options.optimizer, options.optimizer_args):
        unused = [f"--learning_rate {options.learning_rate:g}"] + [f"--{name}" for name in ("unet_lr", "text_encoder_lr")
                                                                  if getattr(options, name)]
        if options.lr_scheduler not in ("constant", "adafactor"):
            unused.append(f"--lr_scheduler {options.lr_scheduler}")
        warnings.append(f"--optimizer_type Adafactor takes its own step size (relative_step, its default): "
                        f"{', '.join(unused)} {'changes' if len(unused) == 1 else 'change'} nothing, as in sd-scripts; for fixed rates add --optimizer_args "
                        "relative_step=False scale_parameter=False warmup_init=False")
    if is_schedule_free(options.optimizer):
        unused = [f"--{name} {getattr(options, name)}" for name in ("lr_scheduler_type", "lr_warmup_steps")
                  if getattr(options, name)]
        unused = ([f"--lr_scheduler {options.lr_scheduler}"] if options.lr_scheduler != "constant" else []) + unused
        if unused:
            warnings.append(f"--optimizer_type {options.optimizer} makes its own schedule: {', '.join(unused)} "
                            f"{'changes' if len(unused) == 1 else 'change'} nothing, as in sd-scripts; give it a "
                            "warm-up with --optimizer_args warmup_steps=N")
    ignored = [f"--{name}" for name in ("train_data_dir", "reg_data_dir", "in_json") if getattr(options, name)]
    if options.dataset_config and ignored:  # sd-scripts says the same
        warnings.append(f"--dataset_config {options.dataset_config} describes the data: {' and '.join(ignored)} "
                        f"{'is' if len(ignored) == 1 else 'are'} not read (put the folders in its subsets)")
    if weight_dtype != DTYPES[options.mixed_precision]:
        full = " and --full_fp16" if options.full_fp16 else " and --full_bf16" if options.full_bf16 else ""
        warnings.append(f"--mixed_precision {options.mixed_precision}{full} on the {device.type.upper()}: the run "
                        "computes and trains in fp32 (half precision pays only on a GPU)")
    warnings += choose_attention(options, device)
    if options.torch_compile and options.dynamo_backend == "no":  # sd-scripts hands accelerate NO: nothing compiled
        warnings.append("--torch_compile with --dynamo_backend no compiles nothing, as in sd-scripts")
    elif options.torch_compile and DYNAMO_TRACES_SLOWLY:
        warnings.append(f"--torch_compile under torch {torch.__version__}: its compiler traces a UNet with a network "
                        "for minutes before the first step (8 minutes for an SD1 UNet with a LoRA on a 2-core CPU), "
                        "so the run looks stalled; later torch traces it in under a minute on the CPU")
    elif options.torch_compile and device.type == "cuda" and options.dynamo_backend == "inductor":
        warnings.append("--torch_compile on CUDA: inductor compiles the UNet with its network before the first step, "
                        "which takes minutes on a full-size model (an SD1.5 UNet with a LoRA had not finished after 3.5 "
                        "minutes on an H200 under torch 2.11), so the run looks stalled until then")
    return warnings


def _prepared_model(options: TrainOptions, device: torch.device, weight_dtype: torch.dtype, warnings: list[str]):
    """The checkpoint loaded, checked against the options, with --base_weights merged, frozen; and the bytes fp8 saved."""
    # fp8: loaded and converted on the CPU, then moved, as sd-scripts does: a 6 GB card never holds the 16-bit SDXL
    fp8 = options.fp8_base or options.fp8_base_unet
    model = load_checkpoint(options.pretrained_model_name_or_path, dtype=weight_dtype,
                            device=torch.device("cpu") if fp8 else device, vae_path=options.vae,
                            vae_dtype=torch.float32 if options.no_half_vae else None,
                            prediction_type="v_prediction" if options.v_parameterization else None)
    if options.zero_terminal_snr:  # trained (and sampled during training) on the rescaled schedule
        model.config = dataclasses.replace(model.config, schedule=dataclasses.replace(model.config.schedule,
                                                                                     zero_terminal_snr=True))
    config = model.config
    _check_model_matches_options(config, options)
    _check_prediction_matches_options(config.prediction_type, options, _how_prediction_was_decided(model.notes))
    if (options.clip_skip or 1) > 1 and not config.takes_clip_skip:
        warnings.append(f"--clip_skip {options.clip_skip} on an {config.label} model: sd-scripts and the WebUI leave "
                        f"{config.label}'s text-encoder layers as they are, and so does this run")
    if options.base_weights:
        warnings += _merge_base_weights(model, options)
    # after the merge, which adds to full-precision weights; before the network reads them
    fp8_saved = sum(store_in_fp8(part) for part in _fp8_parts(model, options))
    if fp8:
        model.to(device)
    for module in model.modules():
        module.requires_grad_(False).eval()
    if options.gradient_checkpointing:
        for module in (model.unet, *model.text_encoders):
            module.gradient_checkpointing = True
    return model, fp8_saved


def _fp8_parts(model, options: TrainOptions) -> list:
    """The parts of ``model`` that keep their weights in fp8, as sd-scripts decides: the UNet (--fp8_base_unet, the
    text encoders keeping the training precision), or it and the text encoders (--fp8_base alone)."""
    if options.fp8_base_unet:
        return [model.unet]
    return [model.unet, *model.text_encoders] if options.fp8_base else []


def _prepared_network(options: TrainOptions, model, spec, train_te: bool, device: torch.device,
                      weight_dtype: torch.dtype, notes: list[str]) -> LoRANetwork:
    """The network to train (fresh, or from --network_weights), on the device, hooked into the model; what the
    user should hear goes into ``notes``."""
    config = model.config
    if options.network_weights and options.dim_from_weights:
        file = read_network(options.network_weights)
        network = network_from_file(config, model.unet, model.text_encoders, file, spec)
        network.spec = _shape_of(file, spec)  # the files this run saves say the rank they hold
        if _other_network_advice(file, spec.algorithm):  # and the kind: a LoHa is not saved labelled networks.lora
            network.spec = _kind_of(file, network.spec)
            args = " ".join(f"{key}={value}" for key, value in network.spec.network_args)
            notes.append(f"--network_weights {options.network_weights} is {' and '.join(sorted(file.algorithms))}: "
                         f"trained and saved as such ({network.spec.network_module}{' ' + args if args else ''}), not "
                         f"as --network_module {spec.network_module}")
    else:
        network = create_network(config, model.unet, model.text_encoders, spec,
                                 not options.network_train_text_encoder_only, train_te)
        if options.network_weights:
            notes += _load_weights(network, options.network_weights)
    network.to(device).train()
    if (options.full_fp16 or options.full_bf16) and weight_dtype != torch.float32:
        network.to(weight_dtype)
    return network.apply_to()


def _free_name_beside(path: Path) -> Path:
    """``name (2).safetensors``, the first free one: where a save goes when ``path`` is held by another program."""
    return next(candidate for n in itertools.count(2)
                if not (candidate := path.with_name(f"{path.stem} ({n}){path.suffix}")).exists())


@contextmanager
def _writing(path: Path):
    """A save that fails (a full disk, a vanished drive) stops the run with what to do; the writes are atomic, so
    every file and state saved before it is intact."""
    try:
        yield
    except Exception as error:  # safetensors and torch.save raise their own kinds for a write that failed
        folder = next((p for p in (path, *path.parents) if p.exists()), None)
        free = shutil.disk_usage(folder).free if folder else None
        full = free is not None and free < 2**26  # under 64 MiB left: torch.save's "unexpected pos" is a full disk
        if not isinstance(error, OSError) and not full and "I/O error" not in str(error):
            raise
        why = (error.strerror or str(error)) if isinstance(error, OSError) else "no space left on the disk" if full else str(error)
        room = f", {free / 2**30:.1f} GiB free there" if free is not None else ""
        fix = "make the folder writable" if isinstance(error, PermissionError) else "make room"
        raise UserError(f"could not write {path}: {why}{room}. Everything saved before it is intact: {fix}, then "
                        "continue from the last state (--resume) or file (--network_weights)") from None


def _predict(model, config, options: TrainOptions, tokenizer, captions: list[str], sizes, latents, noise, input_noise,
             timesteps, abar, v_prediction: bool, device, weight_dtype, train_te: bool = False,
             text_cache: TextEncoderCache | None = None):
    """The UNet's prediction for ``latents`` noised with ``input_noise`` at ``timesteps``, and its target (ε or v of ``noise``)."""
    if text_cache is not None:
        context, pooled = (None if t is None else t.to(device) for t in text_cache.encode(captions))
    else:
        with torch.set_grad_enabled(train_te and torch.is_grad_enabled()):
            context, pooled = encode_captions(config, model.text_encoders, captions, tokenizer, caption_encoding(options, config))
    y = sdxl_vector(pooled, *sizes) if config.needs_size_conditioning else None
    abar = abar.to(device)
    noisy = N.add_noise(latents, input_noise, timesteps, abar)
    target = N.velocity(latents, noise, timesteps, abar) if v_prediction else noise
    with autocast(device.type, weight_dtype):
        prediction = model.unet(noisy.to(weight_dtype), timesteps.to(device), context.to(weight_dtype),
                                None if y is None else y.to(weight_dtype))
    return prediction, target


def _training_step(batch, epoch, step, total_steps, model, config, network: LoRANetwork, options: TrainOptions, tokenizer,
                   abar, v_prediction, generator, device, weight_dtype, data: TrainingData, train_te: bool,
                   rows: slice = slice(None), text_cache: TextEncoderCache | None = None) -> torch.Tensor:
    """Per-sample losses of ``rows`` of the batch; the random draws are made for the whole batch, so every rank's
    generator stays in step and a slice trains exactly what that slice of a single-process batch would."""
    latents = data.encode(batch, model.vae, device, rows).latents.to(device, torch.float32) * config.vae.scaling_factor
    captions = data.captions_for(batch, epoch, step, total_steps, generator)
    noise = N.training_noise(latents, generator, options.noise_offset, options.noise_offset_random_strength,
                             options.adaptive_noise_scale, options.multires_noise_iterations, options.multires_noise_discount)
    timesteps = N.sample_timesteps(len(latents), generator, config.schedule.num_timesteps, options.min_timestep, options.max_timestep)
    perturbed = N.perturbed_input(noise, generator, options.ip_noise_gamma, options.ip_noise_gamma_random_strength)
    sizes = tuple(values[rows] for values in (batch.original_sizes, batch.crops, batch.target_sizes))
    latents, noise, perturbed, timesteps, captions = latents[rows], noise[rows], perturbed[rows], timesteps[rows], captions[rows]
    if not len(latents):
        return torch.zeros(0, device=device)
    prediction, target = _predict(model, config, options, tokenizer, captions, sizes, latents, noise, perturbed,
                                  timesteps, abar, v_prediction, device, weight_dtype, train_te, text_cache)
    masks = None if batch.masks is None else batch.masks[rows].to(device)
    return _per_sample_loss(prediction, target, timesteps, masks, options, config.schedule, v_prediction, device) * \
        batch.loss_weights[rows].to(device)


def _per_sample_loss(prediction, target, timesteps, masks, options: TrainOptions, schedule, v_prediction: bool, device):
    """The loss of each sample as the run trains on it: its loss type (with the Huber schedule), mask and timestep
    weighting (min-SNR, v-prediction scaling, debiased estimation)."""
    huber = None
    if options.loss_type in ("huber", "smooth_l1"):
        huber = N.huber_threshold(timesteps, options.huber_schedule, options.huber_c, options.huber_scale,
                                  schedule.alphas_cumprod).to(device)
    loss = N.masked(N.elementwise_loss(prediction, target, options.loss_type, huber), masks).mean(dim=(1, 2, 3))
    weights = N.loss_weights(timesteps, schedule.loss_weighting_snr, v_prediction, options.min_snr_gamma, options.scale_v_pred_loss_like_noise_pred,
                             options.v_pred_like_loss, options.debiased_estimation_loss)
    return loss * weights.to(device)


@torch.no_grad()
def _validation_loss(data: TrainingData, model, config, options: TrainOptions, tokenizer, abar, v_prediction, device,
                     weight_dtype, text_cache: TextEncoderCache | None = None, *, total_steps: int) -> float:
    """Mean loss of the held-out images at fixed timesteps with fixed noise, comparable across epochs; measured as
    the run trains (loss type, mask, weighting) at sd-scripts' timesteps. ``--max_validation_steps`` counts batches
    of ``--train_batch_size`` images, as sd-scripts' validation loader does."""
    timesteps = torch.tensor(validation_timesteps(options.min_timestep, options.max_timestep, config.schedule.num_timesteps))
    count = len(timesteps)
    losses = []
    limit = None if options.max_validation_steps is None else options.max_validation_steps * options.train_batch_size
    captions = data.validation_captions(total_steps)
    for index, record in enumerate(data.validation[:limit]):
        latents = (record.latents.to(device, torch.float32) * config.vae.scaling_factor).expand(count, -1, -1, -1)
        # the same draws at every evaluation, shaped as training shapes them (offset, pyramid, input perturbation)
        generator = validation_generator(data.validation_seed, index)
        noise = N.training_noise(latents, generator, options.noise_offset, options.noise_offset_random_strength,
                                 options.adaptive_noise_scale, options.multires_noise_iterations,
                                 options.multires_noise_discount)
        perturbed = N.perturbed_input(noise, generator, options.ip_noise_gamma, options.ip_noise_gamma_random_strength)
        sizes = tuple([size] * count for size in sdxl_sizes(record, flipped=False))
        prediction, target = _predict(model, config, options, tokenizer, [captions[index]] * count, sizes,
                                      latents, noise, perturbed, timesteps, abar, v_prediction,
                                      device, weight_dtype, text_cache=text_cache)
        masks = None if record.mask is None else record.mask[None].expand(count, -1, -1).to(device)
        losses.append(float(_per_sample_loss(prediction, target, timesteps, masks, options, config.schedule, v_prediction,
                                             device).mean()))
    return sum(losses) / len(losses)


def _shared_name(image: str) -> str:
    """An image as a file people share names it: ``10_shapes/img_011.png``, as sd-scripts keeps only folder names
    (a full path gives away the user's name on Windows)."""
    path = Path(image)
    return f"{path.parent.name}/{path.name}"


def _check_resumed_optimizer(options: TrainOptions, saved: dict) -> None:
    """A state's optimizer moments only mean something to the optimizer that made them; its step count only means
    the batches it counted at its own accumulation (at another the run ended early without a word). Before loading."""
    accumulation = saved.get("gradient_accumulation_steps", options.gradient_accumulation_steps)
    if accumulation != options.gradient_accumulation_steps:
        raise UserError(f"--gradient_accumulation_steps {options.gradient_accumulation_steps}: --resume {options.resume} "
                        f"counts its steps of {accumulation} batch(es), so the run would end early or late; resume with "
                        f"--gradient_accumulation_steps {accumulation}", "gradient_accumulation_steps")
    made_by = saved.get("optimizer")
    if made_by and made_by.lower() != options.optimizer.lower():
        raise UserError(f"--resume {options.resume} was saved by --optimizer_type {made_by}, and its moments do not fit "
                        f"{options.optimizer}: resume with --optimizer_type {made_by}, or start {options.optimizer} "
                        f"afresh from its network with --network_weights {Path(options.resume) / 'model.safetensors'}")


def group_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each parameter group's rate this step, by sd-scripts' TensorBoard names (textencoder, unet, unet_block3 plus
    …); an Adafactor on its relative step reports the step it took, as sd-scripts' adafactor schedule shows it."""
    return {group.get("description", f"group{i}"): group["step_size"] if group.get("relative_step") and "step_size" in group
            else group["lr"] for i, group in enumerate(optimizer.param_groups)}


def adapted_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """D-Adaptation's and Prodigy's step size d·lr of each group that has one (their lr is a multiplier of d)."""
    return {group.get("description", f"group{i}"): group["d"] * group["lr"]
            for i, group in enumerate(optimizer.param_groups) if isinstance(group.get("d"), (int, float))}


def part_rates(rates: dict[str, float]) -> list[float]:
    """The text encoder's and the UNet's rate (each its first group's), for a one-line view; else every group's."""
    parts = [next((rate for name, rate in rates.items() if name.startswith(part)), None) for part in ("textencoder", "unet")]
    return [rate for rate in parts if rate is not None] or list(rates.values())


def _learning_rates(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each group's base rate (before the schedule scales it)."""
    return [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]


def _check_model_matches_options(config, options: TrainOptions) -> None:
    """--v2 must name an SD2 file. --v_parameterization may go with SDXL: v-prediction SDXL models (NoobAI-XL v-pred)
    are trained so, as sd-scripts allows."""
    if options.v2 and not config.name.startswith("sd2"):
        raise UserError(f"--v2 is set but {options.pretrained_model_name_or_path} is an {config.label} model; drop --v2 "
                        "or pick an SD2 checkpoint", "v2")


def _check_prediction_matches_options(prediction_type: str | None, options: TrainOptions, how: str | None) -> None:
    """The loss options against the prediction type the run trains (a v_pred marker makes a file v-prediction without
    --v_parameterization); None: not known before loading (an SD2 file that declares nothing), checked once loaded.
    ``how``: what of the file decided it (``declared_prediction``'s words), None where nothing did."""
    if prediction_type is None:
        return
    name = Path(options.pretrained_model_name_or_path).name
    if options.v_parameterization:
        decided_by = "--v_parameterization"
    elif how is not None:
        decided_by = f"{name}: {how}"
    else:
        decided_by = f"no --v_parameterization, and {name} declares no v-prediction"
    if problems := prediction_problems(options, prediction_type, decided_by):
        raise UserError("; ".join(problems), "v_parameterization")


def _how_prediction_was_decided(notes: list[str]) -> str | None:
    """The loader's words for what decided the prediction type ("prediction type v_prediction (from x.yaml)")."""
    said = next((note for note in notes if note.startswith("prediction type") and "(" in note), None)
    return None if said is None else said[said.index("(") + 1:].rstrip(")")


def _merge_base_weights(model, options: TrainOptions) -> list[str]:
    """``--base_weights``: networks merged into the base model for good before training (sd-scripts' ``merge_to``);
    the trained network is then meant to be used on top of them. Returns the warnings about modules that fit nothing."""
    multipliers = options.base_weights_multiplier or []
    networks = [(read_network(path), Strength(multipliers[i] if i < len(multipliers) else 1.0))
                for i, path in enumerate(options.base_weights)]
    return [f"--base_weights {report.network}: {len(report.unmatched)} of its modules fit no layer of the base model "
            f"and were skipped (e.g. {report.unmatched[0]})"
            for report in merge_for_good(model.config, model.unet, model.text_encoders, networks) if report.unmatched]


def _alphas(network: LoRANetwork) -> dict[str, float]:
    return {name: float(module.alpha) for name, module in network.items() if "alpha" in module._buffers}


def _loaded_alpha(network: LoRANetwork, asked: dict[str, float]) -> float | None:
    """The --network_alpha value the loaded weights hold where it is not the one asked (``asked``: the modules' alphas
    before loading), else None; the option's value, not the stored one (rsLoRA stores α·√r)."""
    changed = [(asked[name], alpha) for name, alpha in _alphas(network).items() if name in asked and alpha != asked[name]]
    if not changed:
        return None
    before, after = max(set(changed), key=changed.count)
    return network.spec.alpha * after / before


def _spec_with_loaded_alpha(options: TrainOptions, network: LoRANetwork, asked: dict[str, float], events: EventLog):
    """A resumed state keeps the alpha it was trained with (α/rank scales its weights), whatever --network_alpha
    says now: said, and written into the files' metadata as the alpha their tensors hold."""
    alpha = _loaded_alpha(network, asked)
    if alpha is None:
        return network.spec
    events.emit("warning", message=f"--network_alpha {network.spec.alpha:g}: {options.resume} was trained with alpha "
                f"{alpha:g}, which it keeps (the weights are scaled by alpha / rank); its files say {alpha:g}")
    return dataclasses.replace(network.spec, alpha=alpha)


def _shape_of(file, spec):
    """``spec`` with the rank and alpha most of the file's modules have (``--dim_from_weights``)."""
    from ..networks.tools.inspect import rank_and_alpha

    rank, alpha = rank_and_alpha(file)
    return spec if rank is None else dataclasses.replace(spec, dim=rank, alpha=alpha)


def _kind_of(file, spec):
    """``spec`` as the file's own network options (module and args from its metadata, else LyCORIS's name for its
    kind), keeping the rank, alpha and dropout already taken."""
    module = file.metadata.get("ss_network_module") or "lycoris.kohya"
    args = {key: str(value) for key, value in file.training_args.items() if value is not None and key != "dropout"}
    if module == "lycoris.kohya" and "algo" not in args:
        args["algo"] = sorted(file.algorithms)[0]
    return spec_from_kohya(module, spec.dim, spec.alpha, args, spec.dropout)


def _lokr_rank_axis_only(key: str, file_shape, own_shape) -> bool:
    """Whether a LoKr factor differs only along its rank (``lokr_w*_a``: columns, ``lokr_w*_b``: rows), which
    --network_dim sets, not factor or decompose_both."""
    suffix = key.rsplit(".", 1)[-1]
    axis = 1 if suffix.endswith("_a") else 0 if suffix.endswith("_b") else None
    if not suffix.startswith("lokr_") or axis is None or len(file_shape) != len(own_shape):
        return False
    return [n for i, n in enumerate(file_shape) if i != axis] == [n for i, n in enumerate(own_shape) if i != axis]


def _load_weights(network: LoRANetwork, path: str) -> list[str]:
    file = read_network(path)
    state = {f"{name}.{suffix}": tensor for name, tensors in file.modules.items() for suffix, tensor in tensors.items()}
    own = network.state_dict()
    other = [key for key, tensor in state.items() if key in own and own[key].shape != tensor.shape]
    if other:  # torch would stop with a page of size mismatches
        key = other[0]
        ranks = sorted({int(t.shape[0]) for k, t in state.items() if k.endswith(("lora_down.weight", "lokr_w2_b"))})
        rank = f"its rank is {', '.join(map(str, ranks))} and " if ranks else ""
        shapes = (f"{path}: {len(other)} tensors have other shapes than this network's (e.g. {key}: "
                  f"{tuple(state[key].shape)} in the file, {tuple(own[key].shape)} here)")
        if not all(_lokr_rank_axis_only(k, state[k].shape, own[k].shape) for k in other) and \
                all(k.rsplit(".", 1)[-1].startswith("lokr_") for k in other):  # LoKr's split of each layer, not its rank
            given = ", ".join(f"{k}={file.training_args[k]}" for k in ("factor", "decompose_both") if k in file.training_args)
            raise UserError(f"{shapes}: its LoKr factors split the layers otherwise than this run's network_args "
                            f"factor and decompose_both{f' (the file was trained with {given})' if given else ''}; give "
                            "the file's, or add --dim_from_weights to take them from the file")
        if ranks == [network.spec.dim]:  # the ranks agree: the layers themselves are another model's widths
            trained_on = file.metadata.get("ss_sd_model_name")
            raise UserError(f"{shapes}: its rank is this run's, {ranks[0]}, so its layers are of another size: it was "
                            f"trained on {f'{trained_on!r}, ' if trained_on else ''}another base model than this run's; "
                            "continue a LoRA on the model it was trained on (or one of that model's architecture)")
        raise UserError(f"{shapes}: {rank}this run has --network_dim {network.spec.dim}; set the file's --network_dim "
                        "(and --network_alpha), or add --dim_from_weights to take them from the file")

    def part(key: str) -> str:  # lora_unet, lora_te, lora_te1 …: the model part a module belongs to
        words = key.split("_", 2)
        return words[1] if len(words) == 3 else key

    trained = {part(key) for key in own}
    skipped = sorted({part(key) for key in state} - trained)
    state = {key: tensor for key, tensor in state.items() if part(key) in trained}
    asked = _alphas(network)
    missing, unexpected = network.load_state_dict(state, strict=False)
    notes = [f"--network_weights {path}: its {', '.join(TRAINED_PART_NAMES.get(p, p) for p in skipped)} modules "
             "are left out, since this run does not train that part (they are not in the files it saves)"] if skipped else []
    left_out = set(unexpected)
    # no weight of the file would go on training: a run from scratch, unasked
    if left_out and all(key in left_out or key.endswith((".alpha", ".scale")) for key in state):
        raise UserError(f"{path}: {len(unexpected)} tensors fit no module of this network (e.g. {unexpected[0]}); "
                        f"{_other_network_advice(file, network.spec.algorithm)}add --dim_from_weights to take the "
                        "network's kind and shape from the file")
    if unexpected:  # a LoCon's time-embedding module given to networks.lora: left out, as sd-scripts' strict=False does
        notes.append(f"--network_weights {path}: {len(unexpected)} of its tensors fit no module of this network (e.g. "
                     f"{unexpected[0]}): left out, as sd-scripts leaves them out; the others go on training")
    if (alpha := _loaded_alpha(network, asked)) is not None:  # α/rank scales the loaded weights: kept as trained
        notes.append(f"--network_weights {path} holds alpha {alpha:g} and --network_alpha is {network.spec.alpha:g}: "
                     f"the file's alpha is kept (the weights are scaled by alpha / rank, so they go on at the strength "
                     f"they were trained to) and the files this run saves say {alpha:g}. sd-scripts trains at "
                     f"--network_alpha's scale but saves the file's alpha; give --network_alpha {alpha:g} to silence this")
        network.spec = dataclasses.replace(network.spec, alpha=alpha)
    return notes


TRAINED_PART_NAMES = {"unet": "UNet", "te": "text-encoder", "te1": "first text-encoder", "te2": "second text-encoder"}


def _other_network_advice(file, algorithm: str) -> str:
    """Where the file is another kind of network (a LoHa given to networks.lora), the options it was trained with."""
    kinds = sorted(file.algorithms)
    if kinds == [algorithm] or (algorithm == "dylora" and kinds == ["lora"]):
        return ""
    module = file.metadata.get("ss_network_module")
    args = [f"{key}={value}" for key, value in file.training_args.items() if value is not None]  # sd-scripts: dropout=null
    given = (f" with {join_command_line(['--network_module', module, *(['--network_args', *args] if args else [])])}"
             if module else "")
    return f"the file is {' and '.join(kinds)}{given}, this run trains {algorithm}: train it with the file's options, or "
