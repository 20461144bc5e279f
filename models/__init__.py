"""Method families, one file each. `METHODS` maps a config name to a spec with `Params` and `build`."""

from models import maml

METHODS = {
    "maml": maml.MAML,
    "fomaml": maml.FOMAML,
}
