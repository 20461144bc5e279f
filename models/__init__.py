"""Method families, one file each. `METHODS` maps a config name to a spec with `Params` and `build`."""

from bayesmeta.models import (
    baselines,
    bmaml,
    cnp,
    l2f,
    llama,
    maml,
    mr_maml,
    neural_prior,
    neural_process,
    platipus,
    protonet,
    task_gated,
    versa,
)

METHODS = {
    "maml": maml.MAML,
    "fomaml": maml.FOMAML,
    "mr_maml_w": mr_maml.MRMAMLW,
    "mr_maml_a": mr_maml.MRMAMLA,
    "cnp": cnp.CNP,
    "mr_cnp_w": cnp.MRCNPW,
    "mr_cnp_a": cnp.MRCNPA,
    "np": neural_process.NP,
    "platipus": platipus.PLATIPUS,
    "llama": llama.LLAMA,
    "bmaml": bmaml.BMAML,
    "versa": versa.VERSA,
    "neural_prior": neural_prior.NeuralPrior,
    "l2f": l2f.L2F,
    "hsml": task_gated.HSML,
    "arml": task_gated.ARML,
    "protonet": protonet.ProtoNet,
    "finetune": baselines.FineTune,
    "nearest": baselines.NearestNeighbour,
}
