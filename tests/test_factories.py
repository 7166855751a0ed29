"""The factories the bundle configs call (``_target_: monai_icon.<layer>.factories.<name>``): each builds what the
``$``-expression it replaced built, and returns ``None`` where that expression's component was disabled."""

import pytest
import torch
from ignite.engine import Engine
from ignite.handlers import EMAHandler
from monai.handlers import CheckpointLoader
from monai.transforms import Compose, RandFlipd

from monai_icon import reporting
from monai_icon.engines import InstanceOptimisedNet
from monai_icon.engines import factories as engine_factories
from monai_icon.handlers import GradientClipHandler, LabelDice
from monai_icon.handlers import factories as handler_factories
from monai_icon.losses import ICONLoss, MapSupervisionLoss, MultiScaleSimilarity
from monai_icon.losses import factories as loss_factories
from monai_icon.transforms import RandBatchAugmentd, RandLabelSynthesisd, RandSelfPaird
from monai_icon.transforms import factories as transform_factories


class Recorder:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def attach(self, engine):
        self.log.append((self.name, engine))


def test_handler_list_drops_disabled_handlers_and_keeps_rank0_ones_for_the_main_process():
    a, b, c = object(), object(), object()
    assert handler_factories.handler_list([a, None, b], [c, None]) == [a, b, c]
    assert handler_factories.handler_list([a, None], [c], main_process=False) == [a]
    assert handler_factories.handler_list(main_process_handlers=[c]) == [c]


def test_attach_handlers_attaches_the_present_ones_in_order():
    log, engine = [], Engine(lambda e, b: None)
    assert handler_factories.attach_handlers(engine, [Recorder(log, "x"), None, Recorder(log, "y")]) is engine
    assert log == [("x", engine), ("y", engine)]


def test_gradient_clip_and_ema_handlers_are_none_when_off():
    assert handler_factories.gradient_clip_handler(None) is None
    clip = handler_factories.gradient_clip_handler(5)
    assert isinstance(clip, GradientClipHandler) and clip.max_norm == 5.0
    assert handler_factories.ema_handler(torch.nn.Linear(2, 2), None) is None
    ema = handler_factories.ema_handler(torch.nn.Linear(2, 2), "0.01")
    assert isinstance(ema, EMAHandler)


def test_output_items_picks_the_named_values_of_the_first_output():
    transform = handler_factories.output_items(["loss", "map_error"])
    assert transform([{"loss": 1.5, "other": 2}]) == {"loss": 1.5}
    assert transform([{"loss": 1.5, "map_error": 0.1}]) == {"loss": 1.5, "map_error": 0.1}


def test_resume_loader_loads_the_latest_checkpoint_only_when_asked_and_present(tmp_path):
    net = torch.nn.Linear(2, 2)
    assert handler_factories.resume_loader(True, str(tmp_path), {"network": net}) is None  # nothing saved yet
    torch.save({"network": net.state_dict()}, tmp_path / "checkpoint_epoch=1.pt")
    assert handler_factories.resume_loader("false", str(tmp_path), {"network": net}) is None
    loader = handler_factories.resume_loader("true", str(tmp_path), {"network": net}, map_location="cpu")
    assert isinstance(loader, CheckpointLoader) and loader.load_path.endswith("checkpoint_epoch=1.pt")
    with pytest.raises(ValueError, match="resume must be true or false"):
        handler_factories.resume_loader("maybe", str(tmp_path), {})


def test_checkpoint_state_adds_the_moving_average_when_kept():
    net = torch.nn.Linear(2, 2)
    state = handler_factories.checkpoint_state(net, "opt", "trainer", "lambda")
    assert state == {"network": net, "optimizer": "opt", "trainer": "trainer", "adaptive_lambda": "lambda"}
    ema = EMAHandler(net, momentum=0.1)
    assert handler_factories.checkpoint_state(net, "opt", "trainer", "lambda", ema)["ema_network"] is ema.ema_model


def test_label_dice_metrics_adds_one_dice_per_named_label_after_the_others():
    metrics = handler_factories.label_dice_metrics({"val_folds": 1}, {1: "femoral", "2": "tibial"})
    assert list(metrics) == ["val_folds", "val_dice_femoral", "val_dice_tibial"]
    assert all(isinstance(metrics[k], LabelDice) for k in ("val_dice_femoral", "val_dice_tibial"))


def test_batch_augmentation_is_none_when_it_changes_nothing():
    keys = ["moving_image", "fixed_image"]
    assert transform_factories.batch_augmentation(keys, 0, "0", 0.0) is None
    assert transform_factories.batch_augmentation(keys, 0, 0, 0, gamma=1.0) is None
    augment = transform_factories.batch_augmentation(keys, "10", 0.1, 2, gamma=1.25, follow={"a": "fixed_image"})
    assert isinstance(augment, RandBatchAugmentd) and augment.gamma == 1.25 and augment.follow == {"a": "fixed_image"}


def test_pair_flip_self_pairing_and_label_synthesis_are_none_when_their_probability_is_zero():
    assert transform_factories.pair_flip(0.0, [0], seed=0) is None
    assert isinstance(transform_factories.pair_flip("0.5", [1], seed=0), RandFlipd)
    assert transform_factories.self_pairing(0, 4.0) is None
    known = transform_factories.self_pairing("0.5", 4, seed=1)
    assert isinstance(known, RandSelfPaird) and known.prob == 0.5 and known.deform == 4.0
    assert transform_factories.label_synthesis(0.0, 0.0) is None
    assert isinstance(transform_factories.label_synthesis(0.0, 0.5), RandLabelSynthesisd)


def test_batch_transform_chain_and_training_keys():
    first, second = (lambda batch: batch), (lambda batch: batch)
    assert transform_factories.batch_transform_chain([None, None]) is None
    assert transform_factories.batch_transform_chain([None, first]) is first
    assert isinstance(transform_factories.batch_transform_chain([first, None, second]), Compose)
    assert transform_factories.training_keys(False, False) == ["image"]
    assert transform_factories.training_keys(True, True) == ["image", "label", "mask"]


def test_similarity_loss_single_or_multiscale_and_map_supervision():
    assert isinstance(loss_factories.similarity_loss("mse", 3), torch.nn.MSELoss)
    assert loss_factories.similarity_loss("lncc", 3, lncc_kernel="5").kernel_size == 5
    multi = loss_factories.similarity_loss("mse", 3, scales=[1, "2"])
    assert isinstance(multi, MultiScaleSimilarity) and multi.factors == (1, 2)
    assert loss_factories.map_supervision_loss(0) is None
    assert isinstance(loss_factories.map_supervision_loss("0.5"), MapSupervisionLoss)


def test_trainable_parameters_leave_frozen_ones_out():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    net[0].requires_grad_(False)
    assert engine_factories.trainable_parameters(net) == list(net[1].parameters())


def test_cpu_allocator_is_tuned_only_when_asked_on_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(engine_factories, "tune_cpu_allocator", lambda: calls.append(1) or True)
    assert engine_factories.tune_cpu_allocator_on_cpu(False, "cpu") is False
    assert engine_factories.tune_cpu_allocator_on_cpu("true", "cuda:0") is False
    assert engine_factories.tune_cpu_allocator_on_cpu("true", torch.device("cpu")) is True and calls == [1]


@pytest.mark.parametrize("epochs,val_interval,validated", [(3, 1, []), (3, 2, [3]), (4, 2, [])])
def test_train_and_validate_validates_a_last_epoch_the_interval_skipped(epochs, val_interval, validated):
    trainer = Engine(lambda e, b: None)
    runs = []

    class Evaluator:
        def run(self, epoch):
            runs.append(epoch)

    trainer.run = lambda: Engine.run(trainer, [0], max_epochs=epochs)
    assert engine_factories.train_and_validate(trainer, Evaluator(), val_interval) is trainer
    assert runs == validated


def test_instance_optimised_network_reads_command_line_numbers():
    net = engine_factories.instance_optimised_network(torch.nn.Identity(), ICONLoss("mse", 1.0), "3", "1e-4", "cpu")
    assert isinstance(net, InstanceOptimisedNet) and net.steps == 3 and net.lr == 1e-4


def test_print_summary_and_evaluation_title(capsys, tmp_path):
    engine = Engine(lambda e, b: None)
    engine.state.metrics = {"val_dice": 0.5}

    class Loss:
        lmbda = torch.tensor(1.234)

    text = reporting.print_summary(engine, None, None, "ICON 3D stage1: last validation", Loss())
    assert text.startswith("== ICON 3D stage1: last validation (lambda now 1.23) ==") and "0.5000" in text
    assert capsys.readouterr().out.strip() == text
    reporting.print_summary(engine, title="quiet", enabled=False)
    assert capsys.readouterr().out == ""
    assert reporting.evaluation_title("m.pt", 64) == "ICON evaluation of m.pt on 64 test pairs"
    assert reporting.evaluation_title("m.pt", 8, "50").endswith(" on 8 test pairs, instance optimisation 50 steps")


def test_multistep_model_export_writes_the_spec_weights_and_current_lambda(tmp_path):
    from ignite.handlers import EMAHandler as EMA

    from monai_icon.export import MultistepModelExport
    from monai_icon.networks import multistep_registration

    architecture = {"spatial_dims": 3, "coarse_steps": 1, "encoder_channels": [2, 4], "decoder_channels": [4, 2],
                    "coarse_sigma": 0.0, "resample_coarse": "true", "coarse_pool": "average"}
    loss = ICONLoss("mse", 2.5, spatial_dims=3)
    export = MultistepModelExport(architecture, 1, 0, [8, 8, 4], "PIR", "LEFT", "mse", "icon", loss)
    spec = dict(export.network_def)
    spec.pop("_target_")
    network = multistep_registration(**spec)
    assert export(tmp_path / "none.pt", None) is None and not (tmp_path / "none.pt").exists()
    loss.lmbda = 3.0  # the lambda when the file is written
    export(tmp_path / "model.pt", network)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved["network_def"]["resample_coarse"] is True and saved["network_def"]["coarse_factor"] == 1
    assert saved["network_def"]["_target_"] == "monai_icon.networks.multistep_registration"
    assert saved["settings"]["lmbda"] == 3.0 and saved["settings"]["axcodes"] == "PIR"
    export(tmp_path / "ema.pt", EMA(network, momentum=0.5))
    assert (tmp_path / "ema.pt").is_file()
