"""The training loop and the one experience lifecycle every caller uses."""

from .lifecycle import (
           Experience,
           FitResult,
           MethodContext,
           fit_experience,
           load_method_state,
           method_state,
)
from .loop import LoopResult, load_training_state, save_training_state, train_loop
from .losses import lm_loss_masked, shifted_cross_entropy

__all__ = ["Experience", "FitResult", "LoopResult", "MethodContext", "fit_experience", "lm_loss_masked",
           "load_method_state", "load_training_state", "method_state", "save_training_state",
           "shifted_cross_entropy", "train_loop"]
