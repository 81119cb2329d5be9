"""``SizeAwareTrainer``: Ultralytics' ``DetectionTrainer`` that trains with the size-aware loss.

The loss settings (a plain ``{method: settings}`` dict, see ``yolo_sizeloss.config``) are bound to a
trainer *class* by ``SizeAwareTrainer.with_loss(config)``, not to Ultralytics' args, which reject
unknown keys. A class is what Ultralytics builds trainers from (``YOLO(...).train(trainer=cls)``),
and what its multi-GPU worker file (``ultralytics.utils.dist.generate_ddp_file``) pickles to rebuild
the trainer in a fresh process: cloudpickle keeps a class made at run time by value, settings
included. The settings are saved as ``loss.yaml`` in the run folder, and a resumed run reads them
back from there. The model keeps its stock class: the loss is installed as ``model.criterion`` on
the live model only, and Ultralytics strips criteria from what it saves, so checkpoints stay stock.
"""

from __future__ import annotations

from typing import Any

import torch
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK
from ultralytics.utils.torch_utils import unwrap_model

from yolo_sizeloss.assignment import AssignmentCounter
from yolo_sizeloss.checks import SettingsError, ultralytics_dropping
from yolo_sizeloss.config import (
    check_loss_config,
    check_resumed_loss,
    describe_loss,
    loss_name,
    read_loss_record,
    write_loss_record,
)
from yolo_sizeloss.results_csv import class_ap_columns, continue_results, widen_header
from yolo_sizeloss.weighting_plot import plot_weighting
from yolo_sizeloss.yolo.assignment import attach_counter, detach_counters
from yolo_sizeloss.yolo.loss import (AnchorWeighting, install_size_aware_loss, remove_size_aware_loss, stage_overlap,
                                     stock_assigners)


def end_weighting_step(trainer: "SizeAwareTrainer") -> None:
    """``on_train_batch_end`` callback: fold the step's feedback sums into the running state."""
    trainer.weighting.end_step()


def running_sums_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype the weighting's and the counter's running sums take on ``device`` (None: their own float64).
    Apple's MPS holds no float64, and moving a float64 buffer there raises, so there they are float32: exact
    for counts up to 2^24, and a per-epoch mean to about seven digits."""
    return torch.float32 if device.type == "mps" else None


def install_weighting(trainer: "SizeAwareTrainer") -> None:
    """``on_pretrain_routine_end`` callback: the size-aware weights in the live model's criterion.

    Ultralytics runs it last in its set-up, after what the weighting needs: the train loader
    (``nwd`` 'auto' settings are resolved from its labels) and, on resume, the end-to-end criterion
    whose branch gains ``resume_training`` restored (wrapped, not replaced). The EMA copy, made
    before this, keeps a stock criterion, so validation losses compare between modes.
    """
    model = unwrap_model(trainer.model)
    trainer.weighting.to(trainer.device, running_sums_dtype(trainer.device))
    trainer.weighting.resolve_from_labels(trainer.train_loader.dataset.labels, trainer.args.imgsz)
    stock = getattr(model, "criterion", None) or model.init_criterion()
    model.criterion = install_size_aware_loss(stock, trainer.weighting)


def stage_assigner(trainer: "SizeAwareTrainer") -> None:
    """``on_train_epoch_start`` callback: outside ``nwd.assigner_from`` .. ``assigner_until`` of the epochs
    (``ResolvedNWD.assigner_acts``) the assigner ranks anchors by its stock CIoU, inside by ``nwd.assigner``'s
    overlap. Every epoch, so that a run resumed anywhere does too."""
    weighting = trainer.weighting
    acts = weighting.nwd.assigner_acts(trainer.epoch, trainer.epochs)
    if weighting.nwd.assigner and acts != weighting.overlap_acts:
        stage_overlap(unwrap_model(trainer.model).criterion, weighting, acts)
        measure = f"nwd.assigner's overlap ({weighting.nwd.assigner})" if acts else "the stock CIoU"
        LOGGER.info(f"{measure} ranks anchors from epoch {trainer.epoch + 1}")


# a box loss below this, averaged over an epoch, is one the box terms did not learn from (the stock loss's first
# epoch at imgsz 64 on BCCD: about 0.3; the NWD assigner's there: about 1e-8)
EMPTY_BOX_LOSS = 1e-4


def warn_empty_box_loss(trainer: "SizeAwareTrainer") -> None:
    """``on_train_epoch_end`` callback: where the assigner ranks by ``nwd.assigner``'s overlap and the epoch's box
    loss is about 0, say why, once a run.

    The task-aligned assigner scores a positive ``s^0.5 * o^6``, normalised to each object's best overlap ``o``.
    NWD is ``exp(-W / C)``: where an untrained model's boxes miss by many times the constant ``C`` (small objects,
    small input sizes), every ``o`` is near 0, so are the target scores that weigh the box terms and the class
    targets, and the model never learns the boxes that would raise them (docs/methods.md section 5). Nothing in
    the loss is wrong, and nothing else in the log shows it."""
    weighting = trainer.weighting
    if trainer.empty_box_loss_warned or not weighting.assigner_measures:
        return
    box_loss = trainer.label_loss_items(trainer.tloss, prefix="train")["train/box_loss"]
    if box_loss < EMPTY_BOX_LOSS:
        trainer.empty_box_loss_warned = True
        measure = "NWD" if weighting.nwd.assigner is True else weighting.nwd.assigner
        constant = "" if weighting.nwd.constant is None else f" (NWD's constant C = {weighting.nwd.constant:.1f} px)"
        LOGGER.warning(f"train/box_loss {box_loss:.1e} in epoch {trainer.epoch + 1}: the assigner, ranking anchors "
                       f"by {measure}{constant}, gave its positives target scores near 0, so the box terms learn "
                       "nothing: the untrained model's boxes miss their objects by many times C. A larger --imgsz or "
                       "nwd.constant, or the stock assigner (nwd.assigner: false), avoids it (docs/methods.md section 5).")


WEIGHTING_CALLBACKS = {"on_pretrain_routine_end": install_weighting, "on_train_batch_end": end_weighting_step,
                       "on_train_epoch_start": stage_assigner, "on_train_epoch_end": warn_empty_box_loss}


def install_assignment_counter(trainer: "SizeAwareTrainer") -> None:
    """``on_pretrain_routine_end`` callback (after ``install_weighting``): count the assignments of the live
    criterion, every mode's (the stock loss's too: a hook observes, the criterion stays stock)."""
    model = unwrap_model(trainer.model)
    if getattr(model, "criterion", None) is None:
        model.criterion = model.init_criterion()  # what the model's first loss call would build
    trainer.assignments.to(trainer.device, running_sums_dtype(trainer.device))
    attach_counter(trainer.assignments, stock_assigners(model.criterion))


def end_assignment_step(trainer: "SizeAwareTrainer") -> None:
    """``on_train_batch_end`` callback: one more training step in the assignment counts."""
    trainer.assignments.end_step()


COUNTER_CALLBACKS = {"on_pretrain_routine_end": install_assignment_counter, "on_train_batch_end": end_assignment_step}


class SizeAwareTrainer(DetectionTrainer):
    """Detection trainer whose criterion applies the size-aware weightings of ``loss_config``."""

    loss_config: dict[str, dict[str, Any]] = {}  # baseline; bind settings with with_loss()

    @classmethod
    def with_loss(cls, config: str | dict[str, dict[str, Any]]) -> type[SizeAwareTrainer]:
        """A subclass bound to a loss: a name (``"plb+scb"``) or settings (``load_loss_config``'s, or a
        ``{method: {setting: value}}`` of one's own), checked here, before any run folder exists."""
        return type(cls.__name__, (cls,), {"loss_config": check_loss_config(config), "__module__": cls.__module__})

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict[str, Any] | None = None, _callbacks: dict | None = None):
        super().__init__(cfg, overrides, _callbacks)
        self.loss_config = self._resumed_loss_config() if self.resume else type(self).loss_config
        self.weighting = AnchorWeighting(self.loss_config) if self.loss_config else None
        self.assignments = AssignmentCounter()
        self.resumed_seconds = 0.0  # results.csv's time of the epochs a resumed run had trained
        self.empty_box_loss_warned = False  # warn_empty_box_loss says it once a run
        # a DDP worker is built with the launching trainer's callbacks (utils.dist.generate_ddp_file), ours included
        callbacks = [*(WEIGHTING_CALLBACKS.items() if self.weighting is not None else ()), *COUNTER_CALLBACKS.items()]
        for event, callback in callbacks:
            if callback not in self.callbacks[event]:
                self.add_callback(event, callback)
        if RANK in {-1, 0}:
            LOGGER.info(f"size-aware loss: {describe_loss(self.loss_config)}")
            write_loss_record(self.save_dir, self.loss_config)

    def check_resume(self, overrides: dict[str, Any]) -> None:
        """Stock resume check; a new ``epochs`` (above the epochs trained) extends the interrupted run,
        which stock Ultralytics would ignore. Any other setting the stock check did not take (it keeps the
        checkpoint's and only warns) is an error before anything is written: a run the user believes was
        resumed with ``lr0=...`` must not silently train with the old one."""
        # its warning names what it ignored, which the error below names too; its other lines still show
        with ultralytics_dropping(lambda record: record.getMessage().startswith("Resume ignores")):
            super().check_resume({k: v for k, v in overrides.items() if k != "epochs"})
        if not self.resume:
            return
        if "epochs" in overrides:
            self.args.epochs = overrides["epochs"]
        # the stock check's own set of changeable settings is internal to it: what it ignored is read off
        # the result (model and resume become the checkpoint's path by design)
        ignored = [k for k, v in overrides.items() if k not in {"model", "resume"} and v != getattr(self.args, k, None)]
        if ignored:
            asked = " ".join(f"{k}={overrides[k]}" for k in ignored)
            kept = ", ".join(f"{k}={getattr(self.args, k, None)}" for k in ignored)
            raise SettingsError(f"{asked}: a resumed run keeps its own settings ({kept}); "
                                "start a new run to change them")

    def _resumed_loss_config(self) -> dict[str, dict[str, Any]]:
        """The interrupted run's settings from its ``loss.yaml``; a different request is an error naming
        the settings that differ (a resumed run cannot change its loss)."""
        saved, requested = read_loss_record(self.save_dir), type(self).loss_config
        if saved is None:
            LOGGER.warning(f"{self.save_dir} holds no loss record (a run not trained here?): "
                           f"resuming with loss {loss_name(requested)}.")
            return requested
        if requested:  # empty: nothing was asked for, the run's own loss goes on
            note = check_resumed_loss(saved, requested, f"resuming {self.save_dir}")
            if note:
                LOGGER.info(note)
        return saved

    def resume_training(self, ckpt):
        """Stock resume; results.csv then continues from the epoch the checkpoint holds."""
        super().resume_training(ckpt)
        if ckpt is None or not self.resume or RANK not in {-1, 0}:
            return
        self.resumed_seconds = continue_results(self.csv, self.start_epoch)

    def setup_model(self):
        """Stock model setup; on resume, the feedback state comes back from the checkpoint's metrics."""
        ckpt = super().setup_model()
        if self.resume and ckpt and self.weighting is not None:
            if self.weighting.load_feedback_state(ckpt.get("train_metrics") or {}):
                LOGGER.info(f"Resumed feedback state {self.weighting.feedback_state()}")
        return ckpt

    def _load_checkpoint_state(self, ckpt) -> None:
        """Stock; the EMA it rebuilds from the live model (Ultralytics' NaN recovery) gets a stock criterion.

        Its deep copy of the live model copies the size-aware criterion too, and validation losses
        would be weighted from then on; without the wrappers it holds what a baseline run's copy
        holds (an end-to-end loss's current branch gains). Overridden, not a callback: this is where
        the copy is made, where an ``on_train_epoch_start`` callback would undo it after the fact,
        every epoch. On resume the live criterion is still stock here (``install_weighting`` runs later).
        """
        super()._load_checkpoint_state(ckpt)
        criterion = getattr(self.ema.ema, "criterion", None)
        if criterion is not None:
            remove_size_aware_loss(criterion)
            detach_counters(stock_assigners(criterion))

    def validate(self):
        """Stock validation; its metrics gain each class's AP50-95 (``class_ap_columns``), which results.csv
        and the checkpoint's train_metrics then hold."""
        metrics, fitness = super().validate()
        if metrics is not None:
            box = self.validator.metrics.box
            metrics.update(class_ap_columns(self.data["names"], dict(zip(box.ap_class_index, box.ap))))
        return metrics, fitness

    def plot_metrics(self) -> None:
        """Ultralytics' results.png, and beside it weighting.png: where the weight went, epoch by epoch
        (for the stock loss, a note that there is none)."""
        super().plot_metrics()
        plot_weighting(self.save_dir)

    def save_metrics(self, metrics: dict) -> None:
        """Add the epoch's weighting statistics (and feedback state) and assignment counts to results.csv and
        the checkpoint."""
        stats = {**(self.weighting.epoch_stats() if self.weighting is not None else {}), **self.assignments.epoch_stats()}
        self.metrics.update(stats)  # saved as the checkpoint's train_metrics: resume reads them back
        metrics = {**{k: v for k, v in metrics.items() if k not in stats}, **stats}  # fixed column order
        widen_header(self.csv, ["epoch", "time", *metrics])  # a resumed run's file may lack some columns
        # the stock clock restarts at a resume; results.csv's time counts from the run's first start
        self.train_time_start -= self.resumed_seconds
        try:
            super().save_metrics(metrics)
        finally:
            self.train_time_start += self.resumed_seconds
