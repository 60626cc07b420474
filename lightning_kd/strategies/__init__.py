"""Training strategies: who teaches whom, and when.

- :mod:`~lightning_kd.strategies.mutual`: online / mutual distillation (DML, CTCD, BD-KD);
- :mod:`~lightning_kd.strategies.born_again`: born-again generations (BAN);
- :mod:`~lightning_kd.strategies.ema`: a momentum (EMA) teacher, optionally Fisher-masked (MKD, PSMT);
- :mod:`~lightning_kd.strategies.multi_teacher`: several teachers (averaging, ClassroomKD, MST-Distill router,
  data partitioning);
- :mod:`~lightning_kd.strategies.replay`: augmentation replayed from (seed, epoch slot, sample index);
- :mod:`~lightning_kd.strategies.teacher_cache`: teacher outputs computed once and replayed (CED);
- :mod:`~lightning_kd.strategies.augment`: distillation-aware augmentation (MIX-KD partial mixup; CutMixPick is the
  ``cutmixpick`` loss term, T-stddev is :mod:`lightning_kd.metrics`);
- :mod:`~lightning_kd.strategies.hard`: HARD's learned adversarial augmentor (spatial-transformer variant);
- :mod:`~lightning_kd.strategies.averaging`: weight averaging of the student (WAKD).

Each is usable from Python and selectable in the Hydra app (``strategy=``, ``augment=``, ``teacher_cache=``,
``averaging=``).
"""
