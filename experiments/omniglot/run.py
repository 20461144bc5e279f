"""Omniglot from the minimal background sets (METHODS 2, 4 and 8; issue #5).

    .venv/bin/python experiments/omniglot/run.py table [--seeds 0] [--only LABEL ...]
    .venv/bin/python experiments/omniglot/run.py nme   [--seeds 0] [--only LABEL ...]

`table` meta-trains MAML (5- and 20-way), first-order MAML, prototypical networks, TADAM, matching
networks, the siamese net (with Koch et al.'s affine distortions) and the fine-tuning baseline on the
180 characters of 6 alphabets (x 4 rotations = 720 classes), then tests each on the held-out
alphabets Early_Aramaic and Korean (62 characters x 4 rotations; 5-/20-way, 1-/5-shot, 600 tasks, 5
queries per class) and on Lake's 20 within-alphabet one-shot runs, beside 1-NN on pixels.
`nme` trains MAML, TAML and MR-MAML(W) on non-mutually-exclusive 20-way tasks (each training class keeps
one label) and tests them on held-out alphabets with shuffled labels. Each training run is trained
once and evaluated per setting (runs/<run>/evals/<setting>/); finished work is reused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bayesmeta.experiment import Cell, Contrast, contrast_table, contrasts, recorded, run_grid, script
from bayesmeta.stats import Published

HERE = Path(__file__).parent
BASE = HERE / "base.toml"


def train(ways: int, shots: int, queries: int, meta_batch: int, steps: int, *extra: str) -> tuple[str, ...]:
    return (
        f"task.params.ways={ways}",
        f"task.shots={shots}",
        f"task.queries={queries}",
        f"train.meta_batch={meta_batch}",
        f"train.steps={steps}",
        *extra,
    )


# MANN's read sharpened by NTM's key strength, with an add vector (models/mann.py says why)
KEY_STRENGTH = ("model.params.key_strength=true", "model.params.add_vector=true")
# Training protocols, reduced from the papers' to fit about 30 minutes each on 2 CPU cores (see notes)
MAML_5 = ("model.method='maml'", *train(5, 1, 1, 32, 2500), "model.inner_lr=0.4")
METHODS = {
    "MAML 5-way": MAML_5,
    "first-order MAML 5-way": (*MAML_5, "model.method='fomaml'"),
    "MAML 20-way": ("model.method='maml'", *train(20, 1, 1, 16, 2000), "model.inner_lr=0.4"),
    "ProtoNet": ("model.method='protonet'", "model.net.downsample='maxpool'", *train(20, 1, 5, 1, 2000)),
    "fine-tuning": (
        "model.method='finetune'",
        "model.adapt='head'",
        "model.inner_lr=0.5",
        *train(20, 1, 5, 4, 3000),
    ),
    # towards issue #17's 92% on Lake's runs: ProtoNet with Snell et al.'s 60-way training episodes,
    # and with Koch et al.'s affine distortions of the training images (one change each)
    "ProtoNet, 60-way episodes": (
        "model.method='protonet'",
        "model.net.downsample='maxpool'",
        *train(60, 1, 5, 1, 2000),
    ),
    "ProtoNet, distortions": (
        "model.method='protonet'",
        "model.net.downsample='maxpool'",
        "task.params.distort=true",
        *train(20, 1, 5, 1, 2000),
    ),
    # distortions with three times the episodes and Snell et al.'s rate halving every 2,000 of them
    "ProtoNet, distortions, 6,000 episodes": (
        "model.method='protonet'",
        "model.net.downsample='maxpool'",
        "task.params.distort=true",
        "train.lr_schedule='step'",
        *train(20, 1, 5, 1, 6000),
    ),
    # the two together: Snell et al.'s 60-way episodes and rate halving, Koch et al.'s distortions
    "ProtoNet, 60-way episodes, distortions, 6,000 episodes": (
        "model.method='protonet'",
        "model.net.downsample='maxpool'",
        "task.params.distort=true",
        "train.lr_schedule='step'",
        *train(60, 1, 5, 1, 6000),
    ),
    # the same on all 8 alphabets of the minimal sets (242 characters, none held out), so tested on
    # Lake's runs only (their characters come from the evaluation alphabets, outside the minimal sets);
    # its training-time monitor is Lake's runs too (LAKE_ONLY)
    "ProtoNet, distortions, 6,000 episodes, 8 alphabets": (
        "model.method='protonet'",
        "model.net.downsample='maxpool'",
        "task.params.distort=true",
        "task.params.held_out=[]",
        "train.lr_schedule='step'",
        *train(20, 1, 5, 1, 6000),
    ),
    # the metric learners of issue #17, trained as ProtoNet (20-way episodes, 5 queries per class)
    "TADAM": ("model.method='tadam'", "model.net.downsample='maxpool'", *train(20, 1, 5, 1, 2000)),
    "matching networks": (
        "model.method='matching'",
        "model.net.downsample='maxpool'",
        *train(20, 1, 5, 1, 2000),
    ),
    # the paper's softmax over cosines (s = 1) caps a correct 20-way prediction at p = e / (e + 19 / e)
    # = 0.28 (NLL >= 1.27); its seed 0 plateaued at 0.71 held-out 20-way accuracy by episode 1,000.
    # A learned s (started at 10, as cosine classifiers commonly are) lifts that cap
    "matching networks, learned scale": (
        "model.method='matching'",
        "model.net.downsample='maxpool'",
        "model.params.scale=10.0",
        "model.params.learn_scale=true",
        *train(20, 1, 5, 1, 2000),
    ),
    "siamese (distortions)": (
        "model.method='siamese'",
        "model.net.downsample='maxpool'",
        "task.params.distort=true",
        *train(20, 1, 5, 1, 2000),
    ),
    # the memory and graph learners of issue #17: N outputs, so one model per N (as MAML); SNAIL's TC
    # blocks sized for the 5-shot sequence (length N K + 1) so the 1-shot-trained model is tested 5-shot
    "MANN 5-way": ("model.method='mann'", "model.net.downsample='maxpool'", *train(5, 1, 5, 16, 2000)),
    # the plain row stays at chance (the uniform read attention over 128 slots, models/mann.py)
    "MANN 5-way, key strength": (
        "model.method='mann'",
        "model.net.downsample='maxpool'",
        *KEY_STRENGTH,
        *train(5, 1, 5, 16, 2000),
    ),
    "SNAIL 5-way": (
        "model.method='snail'",
        "model.net.downsample='maxpool'",
        "model.params.length=26",
        *train(5, 1, 5, 8, 2000),
    ),
    "SNAIL 20-way": (
        "model.method='snail'",
        "model.net.downsample='maxpool'",
        "model.params.length=101",
        *train(20, 1, 5, 2, 2000),
    ),
    "GNN 5-way": ("model.method='gnn'", "model.net.downsample='maxpool'", *train(5, 1, 5, 8, 2000)),
    "GNN 20-way": ("model.method='gnn'", "model.net.downsample='maxpool'", *train(20, 1, 5, 2, 2000)),
    "1-NN pixels": ("model.method='nearest'", *train(5, 1, 1, 1, 1)),
}
TEST_STEPS = {
    "MAML": 5,
    "first-order": 5,
    "ProtoNet": 1,
    "TADAM": 1,
    "matching": 1,
    "siamese": 1,
    "MANN": 1,
    "SNAIL": 1,
    "GNN": 1,
    "fine-tuning": 50,
    "1-NN": 1,
}


def held_out(ways: int, shots: int) -> tuple[str, ...]:
    return (
        "eval.task.params.split='test'",
        "eval.task.params.labels='standard'",
        f"eval.task.params.ways={ways}",
        f"eval.task.shots={shots}",
        "eval.task.queries=5",
    )


LAKE = (
    "eval.task.family='omniglot_runs'",
    "eval.task.params={}",  # base.toml's held-out-alphabet params do not apply to the runs
    "eval.task.shots=1",
    "eval.task.queries=1",
    "eval.tasks=20",
    "eval.batch=20",
)
METRICS = ("accuracy@1", "accuracy@max")
SETTINGS = {f"{w}-way {k}-shot": held_out(w, k) for w in (5, 20) for k in (1, 5)} | {"Lake's 20 runs": LAKE}
WAYS = {
    "MAML 5-way": (5,),
    "first-order MAML 5-way": (5,),
    "MAML 20-way": (20,),
    "MANN 5-way": (5,),
    "MANN 5-way, key strength": (5,),
    "SNAIL 5-way": (5,),
    "SNAIL 20-way": (20,),
    "GNN 5-way": (5,),
    "GNN 20-way": (20,),
}
LAKE_ONLY = {"ProtoNet, distortions, 6,000 episodes, 8 alphabets"}  # trained on the held-out alphabets too
PUBLISHED = {  # METHODS 2 and 8; full Omniglot (1200 training characters), ours: 180
    ("MAML 5-way", "5-way 1-shot"): Published(0.987, 0.004),
    ("MAML 5-way", "5-way 5-shot"): 0.999,
    ("MAML 20-way", "20-way 1-shot"): Published(0.958, 0.003),
    ("MAML 20-way", "20-way 5-shot"): 0.989,
    ("ProtoNet", "5-way 1-shot"): 0.988,
    ("ProtoNet", "20-way 1-shot"): 0.960,
    ("1-NN pixels", "Lake's 20 runs"): 0.217,
    # METHODS 9: matching networks (Vinyals et al.), the siamese net as Vinyals et al. report it, and
    # Koch et al.'s 92.0% on Lake's runs (full background set, affine distortions)
    ("matching networks", "5-way 1-shot"): 0.981,
    ("matching networks", "5-way 5-shot"): 0.989,
    ("matching networks", "20-way 1-shot"): 0.938,
    ("matching networks", "20-way 5-shot"): 0.985,
    # the same published runs beside the learned-scale row (the paper's s is 1)
    ("matching networks, learned scale", "5-way 1-shot"): 0.981,
    ("matching networks, learned scale", "5-way 5-shot"): 0.989,
    ("matching networks, learned scale", "20-way 1-shot"): 0.938,
    ("matching networks, learned scale", "20-way 5-shot"): 0.985,
    ("siamese (distortions)", "5-way 1-shot"): 0.973,
    ("siamese (distortions)", "5-way 5-shot"): 0.984,
    ("siamese (distortions)", "20-way 1-shot"): 0.881,
    ("siamese (distortions)", "20-way 5-shot"): 0.970,
    ("siamese (distortions)", "Lake's 20 runs"): 0.920,
    # METHODS 9: MANN as Vinyals et al. report it (no convolutions; ours has the conv4 embedding),
    # SNAIL (Mishra et al.), the few-shot GNN (Garcia & Bruna)
    ("MANN 5-way", "5-way 1-shot"): 0.828,
    ("MANN 5-way", "5-way 5-shot"): 0.949,
    ("MANN 5-way, key strength", "5-way 1-shot"): 0.828,
    ("MANN 5-way, key strength", "5-way 5-shot"): 0.949,
    ("SNAIL 5-way", "5-way 1-shot"): 0.9907,
    ("SNAIL 5-way", "5-way 5-shot"): 0.9978,
    ("SNAIL 20-way", "20-way 1-shot"): 0.9764,
    ("SNAIL 20-way", "20-way 5-shot"): 0.9936,
    ("GNN 5-way", "5-way 1-shot"): 0.992,
    ("GNN 5-way", "5-way 5-shot"): 0.997,
    ("GNN 20-way", "20-way 1-shot"): 0.974,
    ("GNN 20-way", "20-way 5-shot"): 0.990,
}


def table_published() -> dict:
    return {(m, s, metric): v for (m, s), v in PUBLISHED.items() for metric in METRICS}


def nme_published() -> dict:
    return {
        (f"{m}, NME {k}-shot", f"20-way {k}-shot", metric): v
        for (m, k), v in NME_PUBLISHED.items()
        for metric in METRICS
    }


def compatible(method: str, setting: str) -> bool:
    if method in LAKE_ONLY:
        return setting == "Lake's 20 runs"
    ways = 20 if setting.startswith("20") or setting.startswith("Lake") else 5
    return ways in WAYS.get(method, (5, 20))


def steps(method: str) -> tuple[str, ...]:
    """Test-time inner steps: 1 (as in training) and the method's longer adaptation."""
    n = next(v for k, v in TEST_STEPS.items() if method.startswith(k))
    return (f"eval.inner_steps={sorted({1, n})}",)


SMOKE = (  # a few steps of every cell, to check the wiring (not results)
    "train.steps=4",
    "train.log_every=2",
    "train.eval_every=4",
    "train.checkpoint_every=4",
    "eval.tasks=20",
    "eval.batch=20",
)


def table(
    seeds: list[int],
    only: list[str] | None,
    out: Path | None = None,
    smoke: bool = False,
    only_recorded: bool = False,
) -> None:
    extra = SMOKE if smoke else ()
    cells = [
        Cell(
            m, s, seed, (*over, *(LAKE if m in LAKE_ONLY else ()), *extra), (*SETTINGS[s], *steps(m), *extra)
        )
        for m, over in METHODS.items()
        if not only or m in only
        for s in SETTINGS
        if compatible(m, s)
        for seed in seeds
    ]
    out = out or HERE / "table"
    run_grid(
        "Omniglot (minimal background sets): held-out alphabets and Lake's 20 one-shot runs",
        BASE,
        recorded(cells, BASE, out) if only_recorded else cells,
        list(METRICS),
        out,
        published=table_published(),
        notes=TABLE_NOTES,
        progress=False,
    )


# MANN's accuracy by instance (Santoro et al.'s protocol, their Table 1 as survey 002 gives it): 5-way
# episodes of 10 presentations per class in training (a random order, labels offset by one step, the
# loss at every step), tested on held-out 5-way episodes of 11 images per class as one sequence
INSTANCE_METRICS = tuple(f"episode_metrics/accuracy_instance_{n}" for n in (1, 2, 3, 4, 5, 10))
INSTANCE_PUBLISHED = dict(zip(INSTANCE_METRICS, (0.364, 0.828, 0.910, 0.926, 0.949, 0.981), strict=True))
MANN_INSTANCES = (
    "model.method='mann'",
    "model.net.downsample='maxpool'",
    "model.params.step_loss=true",
    *KEY_STRENGTH,
    *train(5, 10, 1, 16, 2000),
)


def instances(seeds: list[int], out: Path | None = None, smoke: bool = False) -> None:
    extra = SMOKE if smoke else ()
    ev = (*held_out(5, 1), "eval.task.queries=10", "eval.inner_steps=[1]", *extra)
    cells = [
        Cell("MANN 5-way, every step", "5-way, 11 per class", seed, (*MANN_INSTANCES, *extra), ev)
        for seed in seeds
    ]
    run_grid(
        "MANN on Omniglot (minimal background sets): accuracy by instance (Santoro et al. 2016)",
        BASE,
        cells,
        list(INSTANCE_METRICS),
        out or HERE / "mann_instances",
        published={
            ("MANN 5-way, every step", "5-way, 11 per class", m): v for m, v in INSTANCE_PUBLISHED.items()
        },
        notes=INSTANCE_NOTES,
        progress=False,
    )


INSTANCE_NOTES = """
MANN (LSTM controller of 200 units, 128 x 40 memory, 4 read heads, LRU access, gamma 0.95, with the key
strength and add vector of the table's row `MANN 5-way, key strength`) on the conv4 embedding with max
pooling (Santoro et al. feed 20 x 20 pixels to the controller), trained 2,000 iterations of 16 5-way
episodes of 10 images per class presented in a random order with the labels offset by one step and the
loss at every step (plus one query per class after the sequence); Santoro et al. train 100,000 episodes
on full Omniglot. Testing: 600 held-out 5-way episodes (Early_Aramaic and Korean), 11 images per class
shuffled into one sequence of 55 steps, every label revealed a step later; accuracy at the n-th
presentation of a class. Published: Santoro et al.'s Table 1 (5 classes per episode, their class counts
per episode random rather than fixed).
"""


NME_METHODS = {
    "MAML": ("model.method='maml'", "model.inner_lr=0.4"),
    # beta and the initial posterior scale of the reference MR-MAML(W) Omniglot script (1e-5, -3.0);
    # the stochastic encoder is our conv4's blocks (the reference has its own 4-layer encoder)
    "MR-MAML(W)": (
        "model.method='mr_maml_w'",
        "model.inner_lr=0.4",
        "model.params.beta=1e-5",
        "model.params.rho_init=-3.0",
        "eval.samples=5",
    ),
}
# TAML (Jamal & Qi 2019) on NME Omniglot: the entropy-maximization regularizer (categorical) on MAML;
# survey 002 lists it among the methods that memorize there (9.6% 20-way 1-shot), so, like MAML, its
# rows are judged through the contrast MR-MAML(W) minus TAML
NME_METHODS["TAML"] = ("model.method='taml'", "model.inner_lr=0.4", "model.params.measure='entropy'")
NME_SHOTS = {1: train(20, 1, 1, 16, 2000), 5: train(20, 5, 1, 4, 1500)}
# Yin et al.: mean (sd); MAML's numbers are its memorization failure, judged through the contrast
NME_PUBLISHED = {
    ("MAML", 1): Published(0.078, 0.002, baseline=True),
    ("MR-MAML(W)", 1): Published(0.833, 0.008),
    ("MAML", 5): Published(0.507, 0.229, baseline=True),
    ("MR-MAML(W)", 5): Published(0.941, 0.001),
    ("TAML", 1): Published(0.096, 0.023, baseline=True),  # survey 002's NME table
    ("TAML", 5): Published(0.679, 0.023, baseline=True),
}


# NME Omniglot at the reference's protocol (#18 item 3), from the public MR-MAML(W) Omniglot script of
# Yin et al. (the training script that imports maml_omni_mr_2; found with the code search, store id
# 47462947778; its repository is not named by the index). Its absl flags, line by line:
#   line 24  num_classes 20                 -> 20-way
#   line 26  update_batch_size 1            -> K support and K query images per class (get_batch draws
#                                              2K per class), K = 1; 5-shot sets the flag to 5
#   line 28  metatrain_iterations 60000     -> train.steps = 60000
#   line 30  meta_batch_size 16             -> train.meta_batch = 16
#   line 34  beta 1e-5                      -> MR-MAML(W) model.params.beta
#   line 38  test_num_updates 20            -> eval.inner_steps includes 20
#   line 40  num_updates 5                  -> model.inner_steps = 5
#   line 42  update_lr 0.01                 -> model.inner_lr = 0.01
#   line 44  meta_lr 0.005                  -> train.lr = 0.005
#   line 45  var -3.0                       -> MR-MAML(W) model.params.rho_init = -3 (the initial
#                                              untransformed posterior scale)
#   line 48  norm batch_norm, line 49 num_filters 64, line 51 max_pool False (stride-2 convolutions),
#   line 53  stop_grad False (second order) -> conv4 64 filters, stride 2, batch norm, second order
# get_batch draws, per task, one class from each of the 20 label slots (the NME regime: slot k keeps
# label k). The stochastic encoder (32/48/64 filters with a max pool, then a 196-d Bayesian dense layer,
# lines 35 and the encoder_w definition) is not ours: MR-MAML(W) here is our conv4 with Gaussian conv
# kernels and an adapted linear head. MAML uses the same flags (the script is the paper's MAML with the
# regularizer added). TAML has no reference in Yin et al.'s code: it takes MAML's protocol here.
NME_PAPER_SHOTS = {
    k: (
        *train(20, k, k, 16, 60000),
        "model.inner_steps=5",
        "model.inner_lr=0.01",
        "train.lr=0.005",
        "train.checkpoint_every=1000",
        "train.eval_every=5000",
    )
    for k in (1, 5)
}
NME_PAPER_METHODS = {
    "MAML": ("model.method='maml'",),
    "MR-MAML(W)": (
        "model.method='mr_maml_w'",
        "model.params.beta=1e-5",
        "model.params.rho_init=-3.0",
        "eval.samples=5",
    ),
    "TAML": ("model.method='taml'", "model.params.measure='entropy'"),
}
# Ablation (#18): which setting makes MAML memorize on NME Omniglot, one change at a time from our
# reduced protocol (1 inner step at 0.4, 2,000 iterations, meta-batch 16) towards the reference's
NME_ABLATION = {
    "reduced (1 step at 0.4, 2k iterations)": (),
    "5 inner steps at 0.01 (reference)": ("model.inner_steps=5", "model.inner_lr=0.01"),
    "10k iterations": ("train.steps=10000",),
    "meta-lr 0.005 (reference)": ("train.lr=0.005",),
    "reference inner loop + meta-lr, 10k iterations": (
        "model.inner_steps=5",
        "model.inner_lr=0.01",
        "train.lr=0.005",
        "train.steps=10000",
    ),
    "standard labels (control: mutually exclusive)": ("task.params.labels='standard'",),
}


NME_METRICS = ("accuracy@0", *METRICS)


def nme_settings(k: int) -> dict[str, tuple[str, ...]]:
    """Held-out alphabets with shuffled labels (the test), and fresh NME training tasks, where the
    accuracy without adaptation (accuracy@0) measures how much the model solves them from memory."""
    steps = "eval.inner_steps=[0, 1, 5]"
    train_tasks = ("eval.task.params.split='train'", "eval.task.params.labels='nme'", f"eval.task.shots={k}")
    return {
        f"20-way {k}-shot": (*held_out(20, k), steps),
        f"20-way {k}-shot, NME training tasks": (*train_tasks, "eval.task.queries=5", steps),
    }


def nme(
    seeds: list[int],
    only: list[str] | None,
    shots: list[int] | None = None,
    protocol: str = "reduced",
    extra: tuple[str, ...] = (),
    out: Path | None = None,
) -> None:
    paper = protocol == "paper"
    methods, train_shots = (NME_PAPER_METHODS, NME_PAPER_SHOTS) if paper else (NME_METHODS, NME_SHOTS)
    notes = NME_PAPER_NOTES if paper else NME_NOTES
    cells = [
        Cell(
            f"{m}, NME {k}-shot",
            setting,
            seed,
            (*over, *train_shots[k], "task.params.labels='nme'", *extra),
            (*ev, *(("eval.inner_steps=[0, 1, 5, 20]",) if paper else ()), *extra_eval(extra)),
        )
        for m, over in methods.items()
        if not only or m in only
        for k in train_shots
        if not shots or k in shots
        for setting, ev in nme_settings(k).items()
        for seed in seeds
    ]
    res = run_grid(
        "Non-mutually-exclusive Omniglot 20-way: MAML against MR-MAML(W) (Yin et al. 2020)"
        + (", the reference's protocol" if paper else ""),
        BASE,
        cells,
        list(NME_METRICS),
        out or HERE / ("nme_paper" if paper else "nme"),
        published=nme_published(),
        notes=notes,
        progress=False,
    )
    res.notes = (
        notes
        + "\n### MR-MAML(W) minus MAML, paired by seed\n\n"
        + contrast_table(contrasts(res.outcomes, nme_contrasts()), 100, " pt")
    )
    res.write()


def extra_eval(extra: tuple[str, ...]) -> tuple[str, ...]:
    """A smoke run's evaluation overrides (the eval.* entries of `extra`, applied after the setting's)."""
    return tuple(o for o in extra if o.startswith("eval."))


def nme_ablation(seeds: list[int], extra: tuple[str, ...] = (), out: Path | None = None) -> None:
    """MAML 20-way 1-shot NME, one protocol change at a time: accuracy on held-out alphabets and
    without adaptation on training tasks (memorization)."""
    base = ("model.method='maml'", "model.inner_lr=0.4", *NME_SHOTS[1], "task.params.labels='nme'")
    cells = [
        Cell(label, setting, seed, (*base, *over, *extra), (*ev, *extra_eval(extra)))
        for label, over in NME_ABLATION.items()
        for setting, ev in nme_settings(1).items()
        for seed in seeds
    ]
    run_grid(
        "NME Omniglot 20-way 1-shot: which protocol setting makes MAML memorize (ablation)",
        BASE,
        cells,
        list(NME_METRICS),
        out or HERE / "nme_ablation",
        notes=NME_ABLATION_NOTES,
        progress=False,
    )


def nme_contrasts() -> list[Contrast]:
    """MR-MAML(W) minus each memorizing baseline (MAML, TAML) per shot setting and metric, against the
    published difference."""
    return [
        Contrast(
            f"20-way {k}-shot",
            f"{base}, NME {k}-shot",
            f"MR-MAML(W), NME {k}-shot",
            metric,
            round(NME_PUBLISHED[("MR-MAML(W)", k)].value - NME_PUBLISHED[(base, k)].value, 4),
        )
        for base in ("MAML", "TAML")
        for k in NME_SHOTS
        for metric in METRICS
    ]


TABLE_NOTES = """
Data: the minimal background sets only (small1 + small2 = 242 characters of 8 alphabets, 20 drawers
each), not the full Omniglot the papers use (1200 training characters). Meta-training uses the 180
characters of 6 alphabets, x 4 rotations = 720 classes; testing uses the 62 characters of the held-out
alphabets Early_Aramaic and Korean, also with rotations, 600 tasks per setting with 5 query images per
class (eval seed 1234, the same tasks for every method), and Lake's 20 runs (characters of the
evaluation alphabets, no rotation, the answer key). accuracy@1 is after 1 test-time inner step,
accuracy@max after the method's longer adaptation (MAML 5 steps, fine-tuning 50; ProtoNet and 1-NN
have none, so both columns are equal). The verdict compares with the published number as is (full
Omniglot, far longer training): *matches* when it lies within our 95% CI over the 600 tasks of one
seed widened by 1.96 x the paper's sd where it gives one, else *better* or *worse*.

Training, reduced to about 10-30 minutes per run on 2 CPU cores shared by 2-3 runs at a time: MAML 5-way
1-shot (MAML's settings: conv4 with 64 filters and stride-2 convolutions, transductive batch norm,
meta-batch 32, 1 second-order inner step at alpha 0.4, 1 query per class, Adam 1e-3) for 2,500
iterations instead of 60,000; first-order MAML the same; MAML 20-way 1-shot for 2,000 iterations at
meta-batch 16 with 1 inner step at alpha 0.4 (the paper: 5 steps at alpha 0.1, 60,000 iterations);
ProtoNet (conv4 with max pooling, 64-d embedding) one 20-way 1-shot episode with 5 queries per class per
iteration, 2,000 iterations (the paper: 60-way episodes, many more), and five variants towards issue
#17's 92% on Lake's runs: one change each, 60-way training episodes (Snell et al.'s choice for Omniglot;
3x the images per iteration) and Koch et al.'s affine distortions of the training images, then the
distortions with 6,000 iterations and Snell et al.'s rate halving every 2,000, that one with 60-way
episodes, and the distortions with 6,000 iterations trained on all 8 alphabets (242 characters x 4
rotations, none held out: tested on Lake's runs only, whose characters come from outside the minimal
sets; its training monitor is Lake's runs); fine-tuning
pre-trains one 720-way classifier on the episodes' images (4 20-way episodes of 6 images per class per
iteration, 3,000 iterations), then fits a zero-initialised head on the support set (50 steps at rate
0.5); 1-NN is the Euclidean nearest support image in 28x28 pixels. The metric, memory and graph learners
of issue #17 embed with ProtoNet's conv4 (max pooling) and train 2,000 iterations: TADAM, matching
networks and the siamese net (with Koch et al.'s distortions) on ProtoNet's one 20-way 1-shot episode of
5 queries per class per iteration; MANN, SNAIL and the GNN, which have N outputs, one model per N, on
5-way 1-shot episodes (meta-batch 16 for MANN, 8 for SNAIL and the GNN) or 20-way ones (meta-batch 2).
MANN with the paper's read attention (`MANN 5-way`) stays at the uniform prediction; `MANN 5-way, key
strength` sharpens it by NTM's key strength (started at 10) and writes an add vector instead of the key
(models/mann.py says why). Matching networks take the paper's softmax over cosine similarities (s = 1)
in the row `matching networks`, under which a correct 20-way prediction has probability at most e / (e +
19 / e) = 0.28, and a learned s started at 10 in `matching networks, learned scale`. Each model is
trained once and evaluated in every setting its output layer allows (MAML 5-way in the 5-way settings,
MAML 20-way in the 20-way ones and on Lake's runs); MAML's 5-shot rows use the 1-shot-trained model (the
paper trains 5-shot).

Published scores on Lake's 20 runs (trained on the full background set): people 95.5 %, Bayesian
program learning 95.2 %, convolutional siamese net 92.0 % (with augmentation), plain siamese net
58.3 %, 1-NN on pixels 21.7 % (on the 105x105 images).
"""
NME_NOTES = """
Non-mutually-exclusive (NME) meta-training (Yin et al. 2020, METHODS 4): the 720 training classes are
split once, at random, into 20 label groups; a task takes one class from each group and labels it
with the group's index, so the training tasks can be solved without their support sets, by memorizing
class -> label. Testing uses the held-out alphabets with labels shuffled per task (600 tasks, 5
queries per class): a memorizing model can only guess there. The rows "NME training tasks" evaluate
fresh tasks of the training distribution: accuracy@0 (no adaptation, the support set unused) near 1
means the labels are answered from memory; chance is 0.05.

Protocol, reduced for 2 CPU cores: conv4 (64 filters, stride 2), 1 second-order inner step at alpha
0.4, meta-batch 16 and 2,000 iterations for 1-shot, meta-batch 4 and 1,500 iterations for 5-shot,
1 query per class in training (the reference script: 5 inner steps at alpha 0.01, meta-batch 16,
60,000 iterations). MR-MAML(W) puts Gaussian weights on the conv blocks' kernels (batch-norm scale and
offset deterministic) and adapts the linear head; beta = 1e-5 and an initial posterior scale
rho = -3 (sd = softplus(-3) = 0.049) are the reference script's values; its test predictions average 5
weight draws. The reference encoder differs (4 stochastic layers without batch norm ending in a
196-d layer). Published (full Omniglot, 20-way): 1-shot MAML 7.8 %, MR-MAML(W) 83.3 %; 5-shot 50.7 %
and 94.1 %. MAML's published numbers are the failure the paper demonstrates, so its rows get no
verdict of their own ("failure baseline"): the paper's claim is the contrast MR-MAML(W) minus MAML,
tabled below paired by seed (with one seed there is no interval over seeds, so no verdict).
"""

NME_PAPER_NOTES = (
    NME_NOTES
    + """
This table uses the reference's protocol instead of the reduced one (`run.py nme --protocol paper`):
5 second-order inner steps at 0.01 in training and 20 at test, meta-batch 16, meta learning rate
0.005, 60,000 iterations, 1 query per class per shot (K support + K query), MR-MAML(W) beta 1e-5 and
rho -3; the flags and their lines are cited in run.py (NME_PAPER_SHOTS). TAML has no reference
setting in Yin et al.'s code and takes MAML's. Still the minimal background sets (720 classes with
rotations), not full Omniglot.
"""
)
NME_ABLATION_NOTES = """
MAML on NME Omniglot 20-way 1-shot, our reduced protocol (1 second-order inner step at 0.4, meta-batch
16, 2,000 iterations, meta learning rate 1e-3) changed one setting at a time towards the reference's
(5 steps at 0.01, meta learning rate 0.005, 60,000 iterations), plus the mutually exclusive control.
MAML memorizes when accuracy@0 on NME training tasks is high (labels answered from memory) and its
held-out accuracy falls towards chance (0.05).
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["table", "nme", "nme-ablation", "instances"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--only", nargs="+", help="method labels to run (default: all)")
    p.add_argument("--shots", type=int, nargs="+", help="nme: the shot settings to run (default: 1 and 5)")
    p.add_argument(
        "--protocol",
        choices=["reduced", "paper"],
        default="reduced",
        help="nme: our reduced protocol (nme/) or the reference's settings (nme_paper/, hours per run)",
    )
    p.add_argument("--out", type=Path, help="table, instances: write here instead of the committed folder")
    p.add_argument(
        "--recorded",
        action="store_true",
        help="table: only the cells already recorded, of any of --seeds (rows may differ in seeds); "
        "nothing is trained",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a few training steps and test tasks; nme, nme-ablation: in a temp folder",
    )
    args = p.parse_args()
    extra, out = (), None
    if args.smoke and args.what in ("nme", "nme-ablation"):
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="omniglot_nme_smoke_"))
        extra = SMOKE
        print(f"smoke run in {out}")
    if args.what == "nme":
        nme(args.seeds, args.only, args.shots, args.protocol, extra, out)
    elif args.what == "nme-ablation":
        nme_ablation(args.seeds, extra, out)
    elif args.what == "instances":
        instances(args.seeds, args.out, args.smoke)
    else:
        table(args.seeds, args.only, args.out, args.smoke, args.recorded)


if __name__ == "__main__":
    script(main)
