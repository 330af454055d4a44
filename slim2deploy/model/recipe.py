"""Defaults of the training recipe that the command line shows (no torch: ``--help`` never imports it).

docs/results.md has the runs behind them, and says where a run did not separate a default from its neighbours.
"""

from __future__ import annotations

# distillation: loss = (1 - DISTILL_WEIGHT) * CE + DISTILL_WEIGHT * T^2 * KL(teacher_T || student_T)
DISTILL_WEIGHT = 0.7
DISTILL_TEMPERATURE = 4.0
# the accuracy allowance (points of top-1 the slim model may lose): NNCF's accuracy-aware default, and what
# distilled fine-tuning keeps within at the study's 2x
MAX_DROP = 1.0
# epochs build fine-tunes for when it is given data
FINETUNE_EPOCHS = 3
