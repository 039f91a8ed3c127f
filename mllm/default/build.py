"""`mllm default train`: make the embedded default model from the built corpora, every stage, one command.

    image_tokenizer  tokenizers/image_diffusion_captioned_tiny.yaml  ┐ `mllm tokenize train`; skipped for a
    audio_tokenizer  tokenizers/audio_mel_diffusion_tiny.yaml        │ modality given a trained directory
    video_tokenizer  tokenizers/video_divot_captioned_tiny.yaml      ┘
    image_ink        tokenizers/image_ink_invariance_tiny.yaml: a copy of the image tokenizer that writes the
                     tokens the LM learns to read for a digit in any ink on any paper, anywhere in its frame
    video_ink        tokenizers/video_ink_invariance_tiny.yaml: the same for the video tokenizer, a clip in any
                     ink on any paper, framed any way; the ink stages' tokenizers are the ones shipped
    text             finetune/recipes/default_text.yaml: SentencePiece tokenizer, then LM pretraining
    corpora          the built corpora; spoken replies in one house voice, padded to `audio_seconds`, and
                     requested animations in one canonical layout (mllm/default/corpus.py)
    *_tokens         the multimodal stage's images, clips and sounds, encoded into its token cache ahead of it
    multimodal       finetune/recipes/default_multimodal.yaml: every task, GMM heads
    speech           finetune/recipes/default_speech_head.yaml: the audio head alone, on the frozen LM
    video            finetune/recipes/default_video_head.yaml: the video head alone, on the frozen LM
    diffusion        finetune/recipes/default_diffusion_head.yaml: a diffusion image head on the frozen LM
    ship             float16 copies of both variants in <out>/checkpoint/{gmm,diffusion}; with `ship`,
                     also into the package (mllm/default/checkpoint/), where chat, serve, eval and demo find them

The tokenizers, their ink stages, the text stage, the corpora stage and the encoding of the multimodal
stage's media into its token cache (`image_tokens`, `video_tokens`, `audio_tokens`) need only the built corpora
and each other, so they run side by side on two processes of one thread each (`side_by_side`): a stage starts
once the stages it `needs` are done, the first ready one in `SIDE_BY_SIDE` order taking the first free process.
On two cores, two one-thread trainings finish in ~0.8 of the time they take one after another on both threads
(the video tokenizer: 1368 s beside another job, 863 s alone). Each stage's output goes to
`<out>/logs/<stage>.log`, writes its loss curve (`loss.png`) and is skipped when its output exists, so an
interrupted build continues where it stopped. Seeds are fixed in the recipes. Stage times go to
`<out>/stages.json`.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from mllm.data.corpora.build import check_corpora
from mllm.default.corpus import prepare_corpora
from mllm.default.paths import CHECKPOINTS
from mllm.default.ship import install, ship, size_mb
from mllm.errors import InputError
from mllm.files import atomic_write_text
from mllm.tokenize import commands as tokenize
from mllm.train import FinetuneConfig, finetune, load_recipe
from mllm.train.distributed import on_sigterm
from mllm.train.recipe_data import encode_recipe_media

ROOT = Path(__file__).resolve().parents[2]  # the repository: its tokenizers/ and finetune/recipes/
MODALITIES = ("image", "audio", "video")
# The stages run side by side, each free process taking the first ready one in this order. With the shipped
# build's stage times (docs/default_model.md) one process runs image tokenizer → image ink → text → corpora →
# image and video tokens, the other video tokenizer → video ink → audio tokenizer → audio tokens.
SIDE_BY_SIDE = ("image_tokenizer", "video_tokenizer", "image_ink", "video_ink", "audio_tokenizer", "text", "corpora",
                "image_tokens", "video_tokens", "audio_tokens")
# The multimodal stage's media, encoded side by side on one thread into its token cache, so that its serial run
# encodes nothing. (Audio tokens on one thread differ from those on two in their last bits, up to 6e-6.)
ENCODED_AHEAD = ("image", "video", "audio")


@dataclass
class DefaultBuildConfig:
    corpora: Path  # built corpora (`mllm data build`)
    out: Path = Path("runs/default")
    tokenizers: dict[str, Path] = field(default_factory=dict)  # modality -> an already trained tokenizer recipe dir
    tokenizer_recipes: dict[str, Path] = field(default_factory=lambda: {
        "image": ROOT / "tokenizers" / "image_diffusion_captioned_tiny.yaml",
        "audio": ROOT / "tokenizers" / "audio_mel_diffusion_tiny.yaml",
        "video": ROOT / "tokenizers" / "video_divot_captioned_tiny.yaml",
    })
    ink_recipes: dict[str, Path] = field(default_factory=lambda: {  # modality -> its ink stage's recipe
        "image": ROOT / "tokenizers" / "image_ink_invariance_tiny.yaml",
        "video": ROOT / "tokenizers" / "video_ink_invariance_tiny.yaml",
    })
    recipes: Path = ROOT / "finetune" / "recipes"
    corpora_used: list[str] = field(default_factory=lambda: ["digits", "stamps", "speech", "sounds", "video", "interleaved"])
    audio_seconds: float = 2.4  # 60 tokens of the mel tokenizer: every spoken reply
    # The image tokenizer learns digits only; its stamps come back unreadable, and learning to draw them
    # slowed the digits' drawing (the parallel head's loss stayed high), so the model does not draw stamps.
    skip_tasks: dict[str, set[str]] = field(default_factory=lambda: {"stamps": {"image_generation"}})
    overrides: dict[str, list[str]] = field(default_factory=dict)  # stage -> dotted recipe overrides
    ship: bool = False  # also install into the package


@dataclass(frozen=True)
class Stage:
    name: str
    done: Path  # exists once the stage has finished
    work: Callable[[], object]  # picklable: side-by-side stages run in other processes
    needs: tuple[str, ...] = ()  # the stages whose output it reads

    def run(self) -> float | None:
        """Seconds the stage took; None when it was done earlier."""
        if self.done.exists():
            print(f"[default] {self.name}: done earlier ({self.done})", flush=True)
            return None
        print(f"[default] {self.name} ...", flush=True)
        started = time.perf_counter()
        self.work()
        seconds = round(time.perf_counter() - started, 1)
        print(f"[default] {self.name}: {seconds:.0f} s", flush=True)
        return seconds


def run_stage(stage: Stage, log: Path) -> float | None:
    """Run `stage` in this process on one thread, printing (native libraries too) into `log`."""
    import torch

    torch.set_num_threads(1)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            os.dup2(f.fileno(), fd)
        try:
            return stage.run()
        except Exception as e:
            traceback.print_exc()
            raise RuntimeError(f"{stage.name} failed ({type(e).__name__}: {e})") from None


def start_worker() -> None:
    """Set up a side-by-side worker: the build's process alone answers Ctrl-C (it ends the workers), and a
    worker whose build process has gone, however it went, ends at once instead of training on for nobody."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=exit_with, args=(multiprocessing.parent_process().sentinel,), name="exit-with-build",
                     daemon=True).start()


def exit_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def end_workers(pool: ProcessPoolExecutor) -> None:
    """Kill the pool's processes now, whatever they are running (`kill_workers()` from Python 3.14). SIGKILL, not
    SIGTERM: a finetuning stage takes SIGTERM as a request to finish its step, and the worker would live on."""
    if hasattr(pool, "kill_workers"):
        pool.kill_workers()
        return
    processes = list(pool._processes.values())  # no public way to reach them before Python 3.14
    for process in processes:
        process.kill()
    for process in processes:
        process.join()
    pool.shutdown(wait=False, cancel_futures=True)


@contextmanager
def ending_workers_on_exit(pool: ProcessPoolExecutor, running: dict[Future, Stage]) -> Iterator[None]:
    """Ends the workers when the block is left by an exception (Ctrl-C, SIGTERM, a bug): none trains on unwatched."""
    try:
        yield
    except BaseException:
        end_workers(pool)
        if running:
            tqdm.write(f"[default] ended the running stages: {', '.join(s.name for s in running.values())}")
        raise


def side_by_side(stages: list[Stage], logs: Path, processes: int = 2,
                 record: Callable[[dict[str, float]], None] = lambda times: None) -> dict[str, float]:
    """Run `stages` on `processes` processes of one thread each. A stage starts once every stage of `stages` it
    needs has finished (needs outside `stages` are taken as done), the first ready one in list order going to
    the first free process; its output goes to `<logs>/<name>.log`, its time to `record` as it finishes. A
    failed stage lets the stages that do not need it finish (their work is kept), then raises, naming its log;
    the stages that need it never start. Ctrl-C or SIGTERM ends the running stages with the build: each starts
    afresh on the next run, as a stage is done only once its `done` path exists."""
    names = {s.name for s in stages}
    print(f"[default] side by side on {processes} processes of one thread each: {', '.join(s.name for s in stages)} "
          f"(logs: {logs})", flush=True)
    waiting = list(stages)
    running: dict[Future, Stage] = {}
    finished: set[str] = set()
    failures: dict[str, str] = {}
    times: dict[str, float] = {}
    # SIGTERM raises SystemExit(143), so that the workers are ended on the way out; its default would leave them
    with on_sigterm(lambda signum, frame: sys.exit(128 + signum)), \
            tqdm(total=len(stages), desc="stages side by side", unit="stage") as bar, \
            ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"), initializer=start_worker) as pool, \
            ending_workers_on_exit(pool, running):
        while waiting or running:
            for stage in list(waiting):
                if failed := [n for n in stage.needs if n in failures]:
                    waiting.remove(stage)
                    failures[stage.name] = f"{stage.name} did not run: it needs {failed[0]}"
                    bar.update(1)
                elif len(running) < processes and all(n in finished or n not in names for n in stage.needs):
                    waiting.remove(stage)
                    running[pool.submit(run_stage, stage, logs / f"{stage.name}.log")] = stage
            if not running:
                if waiting:
                    raise ValueError(f"stages that need each other: {', '.join(s.name for s in waiting)}")
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                stage = running.pop(future)
                try:
                    seconds = future.result()
                except Exception as e:
                    failures[stage.name] = f"{e}; its output: {logs / f'{stage.name}.log'}"
                    tqdm.write(f"[default] {failures[stage.name]}" + ("; the other stages go on" if running or waiting else ""))
                else:
                    finished.add(stage.name)
                    if seconds is not None:
                        times[stage.name] = seconds
                        record({stage.name: seconds})
                bar.update(1)
    if failures:
        raise RuntimeError("; ".join(failures.values()))
    return times


class Build:
    def __init__(self, cfg: DefaultBuildConfig):
        self.cfg, self.out = cfg, cfg.out.absolute()
        self.check_options()
        self.times_file = self.out / "stages.json"
        self.times = json.loads(self.times_file.read_text()) if self.times_file.is_file() else {}

    def check_options(self) -> None:
        """Refuse a given tokenizer of no modality and overrides of no stage: either would be ignored, and the
        build would train for hours on what it was told not to."""
        if unknown := [m for m in self.cfg.tokenizers if m not in MODALITIES]:
            raise InputError(f"a given tokenizer for {unknown[0]!r}: no such modality (modalities: "
                             f"{', '.join(MODALITIES)}; give one as MODALITY=DIR)")
        stages = self.stages()
        if unknown := [s for s in self.cfg.overrides if s not in stages]:
            raise InputError(f"overrides for {unknown[0]!r}: no such stage (stages: {', '.join(stages)}; "
                             "an override is STAGE:KEY=VALUE)")

    def record(self, times: dict[str, float]) -> None:
        self.times.update(times)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.times_file, json.dumps(self.times, indent=1) + "\n")

    def tokenizer_dir(self, modality: str) -> Path:
        given = self.cfg.tokenizers.get(modality)
        return Path(given).absolute() if given else self.out / "tokenizers" / modality

    def recipe(self, stage: str, recipe: str, overrides: list[str]) -> FinetuneConfig:
        return load_recipe(self.cfg.recipes / recipe, overrides + self.cfg.overrides.get(stage, []))

    def finetune(self, stage: str, recipe: str, overrides: list[str]) -> None:
        finetune(self.recipe(stage, recipe, overrides))

    def encode(self, modality: str, overrides: list[str], done: Path) -> None:
        """The multimodal stage's media of `modality`, encoded into its token cache; their counts into `done`."""
        stats = encode_recipe_media(self.recipe("multimodal", "default_multimodal.yaml", overrides), [modality])
        atomic_write_text(done, json.dumps(asdict(stats), indent=1) + "\n")

    def stages(self) -> dict[str, Stage]:
        o, corpora, data = self.out, Path(self.cfg.corpora).absolute(), self.out / "data"
        trained = [m for m in MODALITIES if m not in self.cfg.tokenizers]
        stages = [Stage(f"{m}_tokenizer", o / "tokenizers" / m / "metrics.json", partial(
            tokenize.train, self.cfg.tokenizer_recipes[m], corpora, o / "tokenizers" / m,
            self.cfg.overrides.get(f"{m}_tokenizer", []))) for m in trained]
        # each ink stage teaches a copy of the tokenizer the LM trains on: that tokenizer's tokens are its targets
        stages += [Stage(f"{m}_ink", o / "tokenizers" / f"{m}_ink" / "metrics.json", partial(
            tokenize.train, recipe, corpora, o / "tokenizers" / f"{m}_ink",
            [f"teacher={self.tokenizer_dir(m)}"] + self.cfg.overrides.get(f"{m}_ink", [])), needs=(f"{m}_tokenizer",))
            for m, recipe in self.cfg.ink_recipes.items()]
        common = [f"data.cache_dir={o / 'cache'}"]
        media = [f"model.media.{m}.path={self.tokenizer_dir(m) / 'media_tokenizer'}" for m in MODALITIES]
        multimodal = common + media + [f"output_dir={o / 'multimodal'}", f"model.base={o / 'text' / 'final'}", f"data.root={data}"]
        stages += [
            Stage("text", o / "text" / "final", partial(self.finetune, "text", "default_text.yaml", common + [
                f"output_dir={o / 'text'}", f"model.tokenizer={o / 'text_tokenizer'}", f"data.root={corpora}"])),
            Stage("corpora", data / "done", partial(self.corpora, corpora, data)),
        ]
        counts = {m: o / "cache" / f"{m}_tokens.json" for m in ENCODED_AHEAD}  # also each stage's done marker
        stages += [Stage(f"{m}_tokens", counts[m], partial(self.encode, m, multimodal, counts[m]),
                         needs=(f"{m}_tokenizer", "corpora")) for m in ENCODED_AHEAD]
        stages.append(Stage("multimodal", o / "multimodal" / "final",
                            partial(self.finetune, "multimodal", "default_multimodal.yaml", multimodal)))
        before = "multimodal"  # each head stage (recipe default_<run>.yaml) starts from the stage before it
        for name, run in (("speech", "speech_head"), ("video", "video_head"), ("diffusion", "diffusion_head")):
            stages.append(Stage(name, o / run / "final", partial(self.finetune, name, f"default_{run}.yaml", common + [
                f"output_dir={o / run}", f"init_from={o / before / 'final'}", f"data.root={data}"])))
            before = run
        return {s.name: s for s in stages}

    def corpora(self, corpora: Path, data: Path) -> None:
        prepare_corpora(corpora, data, self.cfg.corpora_used, set(MODALITIES), self.cfg.audio_seconds, self.cfg.skip_tasks)
        (data / "done").touch()

    def check_corpora(self, stages: dict[str, Stage] | None = None) -> None:
        """Raise CorporaError when the build cannot start from its corpora (missing, or an older mllm's), unless
        every stage (of `stages`, by default all) is done and none reads them."""
        if not all(stage.done.exists() for stage in (stages or self.stages()).values()):
            check_corpora(Path(self.cfg.corpora).absolute())

    def run(self) -> dict[str, float]:
        stages = self.stages()
        self.check_corpora(stages)
        parallel = [stages[n] for n in SIDE_BY_SIDE if n in stages and not stages[n].done.exists()]
        if len(parallel) > 1:
            started = time.perf_counter()
            side_by_side(parallel, self.out / "logs", record=self.record)
            self.record({"side_by_side_wall": round(time.perf_counter() - started, 1)})
        for stage in stages.values():
            if (seconds := stage.run()) is not None:
                self.record({stage.name: seconds})
        detokenizers = {m: self.tokenizer_dir(m) / "detokenizer" for m in MODALITIES}
        shipped = self.out / "checkpoint"
        inked = {m: self.out / "tokenizers" / f"{m}_ink" / "media_tokenizer" for m in self.cfg.ink_recipes}
        ship(self.out / "video_head" / "final", detokenizers, shipped / "gmm", media_tokenizers=inked)
        ship(self.out / "diffusion_head" / "final", detokenizers, shipped / "diffusion", shared=shipped / "gmm")
        print(f"[default] checkpoints: {shipped} ({size_mb(shipped):.1f} MB)")
        if self.cfg.ship:
            install(shipped, CHECKPOINTS)
            print(f"[default] installed into the package: {CHECKPOINTS} ({size_mb(CHECKPOINTS):.1f} MB)")
        return self.times
