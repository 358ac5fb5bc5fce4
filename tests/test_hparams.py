"""A run's HParams entry (bnexp/run/hparams.py), read back from the protos TensorBoard parses.

What the real HParams tab makes of it is tested through the server in test_tensorboard_server.py.
"""

from tensorboard.plugins.hparams import api_pb2, metadata

from bnexp.config import flatten, norm_names
from bnexp.run.hparams import hparams_summaries
from conftest import compose_config

PINNED_TITLES = ["norm", "optim.lr", "seed", "optim", "model.activation"]


def parsed(status="completed"):
    config = flatten(compose_config(["norm=native", "optim.lr=0.3", "seed=4", "data.root=/some/machine/path"]))
    exp, start, end = hparams_summaries(config, status, wall_s=2.0)
    tags = [s.value[0].tag for s in (exp, start, end)]
    assert tags == [metadata.EXPERIMENT_TAG, metadata.SESSION_START_INFO_TAG, metadata.SESSION_END_INFO_TAG]
    content = lambda s: s.value[0].metadata.plugin_data.content
    return (metadata.parse_experiment_plugin_data(content(exp)),
            metadata.parse_session_start_info_plugin_data(content(start)),
            metadata.parse_session_end_info_plugin_data(content(end)))


def test_distinguishing_keys_sort_first_under_their_own_titles():
    """The tab sorts hparams by name and ticks the first five: these must be norm, lr, seed, optim, activation."""
    experiment, start, _ = parsed()
    infos = sorted(experiment.hparam_infos, key=lambda i: i.name)
    assert [i.display_name for i in infos[:5]] == PINNED_TITLES
    assert [i.name for i in experiment.hparam_infos] == sorted(i.name for i in experiment.hparam_infos)
    assert start.hparams["1.norm"].string_value == "native"
    assert start.hparams["2.optim.lr"].number_value == 0.3 and start.hparams["3.seed"].number_value == 4
    assert list(infos[0].domain_discrete) == list(norm_names())  # every norm a run can have, custom_noisy too


def test_no_machine_paths_and_booleans_stay_booleans():
    experiment, start, _ = parsed()
    names = {i.name for i in experiment.hparam_infos}
    assert "data.root" not in names and "data.root" not in start.hparams
    assert not any("/some/machine" in v.string_value for v in start.hparams.values())
    (normalize,) = [i for i in experiment.hparam_infos if i.name == "data.normalize"]
    assert normalize.type == api_pb2.DATA_TYPE_BOOL and list(normalize.domain_discrete) == [False, True]
    assert start.hparams["data.normalize"].WhichOneof("kind") == "bool_value"
    assert start.hparams["data.normalize"].bool_value is True
    assert set(start.hparams) == names  # every column has this run's value


def test_metrics_trial_name_and_status():
    """Final accuracies and steps to 95% first; no group name (the trial is the run); diverged = failure."""
    experiment, start, end = parsed()
    assert [m.name.tag for m in experiment.metric_infos] == [
        "test/acc", "val/acc", "summary/steps_to_0.95", "test/loss", "val/loss"]
    assert start.group_name == ""
    assert end.status == api_pb2.STATUS_SUCCESS
    assert parsed("diverged")[2].status == api_pb2.STATUS_FAILURE
