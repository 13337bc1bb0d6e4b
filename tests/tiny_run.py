"""The smallest ``dvmrl run`` budget, shared by the tests of the main job."""

from dvmrl.experiment import Preset

# Small enough that an uninterrupted run takes seconds, large enough that
# each method has several units to interrupt between.
TINY = Preset(
    name="tiny",
    epochs=6,
    trial_epochs=2,
    seeds=1,
    max_train=200,
    max_val=120,
    retrain_epochs=2,
    robust_n=4,
    n_initial_points=2,
    agent_slice=2,
    adversarial_steps=4,
    adversarial_starts=1,
)
