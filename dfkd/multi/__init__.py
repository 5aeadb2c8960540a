"""Several teachers as one: the ensemble over the union of their classes, the combiners that
merge their logits, feature amalgamation, and the synthesizer an ensemble drives."""
from dfkd.multi import calibrated, combiners  # noqa: F401  (registers the combiners)
