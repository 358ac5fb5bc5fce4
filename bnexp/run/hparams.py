"""A run's HParams entry: which config keys, under which names, with which types and metrics.

What the HParams tab of TensorBoard 2.21 does with it (read from its source, checked through its
HTTP API by tests/test_tensorboard_server.py):

- It takes the experiment (columns, types, domains, metrics) from the first run holding one, so
  every run writes the same experiment: it depends on the config's keys, never on its values.
- It orders hparams by name and ticks only the first five. The keys that tell runs apart get
  names that sort first ("1.norm", "2.optim.lr", ...) and their plain key as display name,
  which is what the table shows; the other keys follow under their own names.
- A bool written as a number shows as 1.0000 (torch's `summary.hparams` does that): bools go
  in as bools here, with the domain [false, true].
- A session without a group name is listed under its run's name: no group name is written, so
  a trial is its run dir.
"""

from __future__ import annotations

import os
import time
from typing import Any

from google.protobuf import struct_pb2
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

from bnexp.config import ACTIVATIONS, DEVICES, GRAPH_MODES, RESUME_MODES, norm_names
from bnexp.run.tags import STEPS_TAG, STEPS_TARGET

# Config key -> the column title; in this order they are the columns ticked by default.
PINNED = {"norm.name": "norm", "optim.lr": "optim.lr", "seed": "seed", "optim.name": "optim",
          "model.activation": "model.activation"}
NOT_HPARAMS = ("data.root",)  # a path of the machine, not a property of the experiment
DOMAINS = {"norm.name": norm_names(), "optim.name": ("sgd", "adam"), "model.activation": ACTIVATIONS,
           "device": DEVICES, "train.resume": RESUME_MODES, "train.cuda_graphs": GRAPH_MODES}
# (tag, title) in the order of the metric columns; the tab ticks the first five
METRICS = (("test/acc", "test/acc (final)"), ("val/acc", "val/acc (final)"),
           (STEPS_TAG, f"steps to val/acc {STEPS_TARGET:g} (NaN: never)"), ("test/loss", "test/loss (final)"),
           ("val/loss", "val/loss (final)"))
STATUS = {"completed": api_pb2.STATUS_SUCCESS, "diverged": api_pb2.STATUS_FAILURE}


def hparam_name(key: str) -> str:
    """The name a config key is logged under: pinned keys sort first, in PINNED's order."""
    if key in PINNED:
        return f"{list(PINNED).index(key) + 1}.{PINNED[key]}"
    return key


def hparam_values(config: dict[str, Any]) -> dict[str, bool | float | str]:
    """The flattened config as {key: value} for HParams: no machine paths, None as 'None'."""
    values = {}
    for key, value in config.items():
        if key in NOT_HPARAMS or (isinstance(value, str) and os.path.isabs(value)):
            continue
        values[key] = "None" if value is None else value
    return values


def _value(v: bool | int | float | str) -> struct_pb2.Value:
    if isinstance(v, bool):  # before int: bool is an int in Python
        return struct_pb2.Value(bool_value=v)
    if isinstance(v, (int, float)):
        return struct_pb2.Value(number_value=float(v))
    return struct_pb2.Value(string_value=str(v))


def _info(key: str, v) -> api_pb2.HParamInfo:
    info = api_pb2.HParamInfo(name=hparam_name(key), display_name=PINNED.get(key, key))
    if isinstance(v, bool):
        info.type = api_pb2.DATA_TYPE_BOOL
        info.domain_discrete.extend([False, True])
    elif isinstance(v, (int, float)):
        info.type = api_pb2.DATA_TYPE_FLOAT64  # no domain: the tab offers a min..max filter
    else:
        info.type = api_pb2.DATA_TYPE_STRING
        if key in DOMAINS:  # an unknown domain stays unset: one run's value would hide the others
            info.domain_discrete.extend(DOMAINS[key])
    return info


def _summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data))])


def hparams_summaries(config: dict[str, Any], status: str, wall_s: float) -> list[Summary]:
    """Experiment, session start and session end for one finished run (completed or diverged).

    The metric values are not in here: the tab reads each metric's last scalar in the run.
    A diverged run ends as STATUS_FAILURE, so the tab's status filter can hide it.
    """
    values = hparam_values(config)
    order = sorted(values, key=hparam_name)
    experiment = api_pb2.Experiment(
        hparam_infos=[_info(k, values[k]) for k in order],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=title)
                      for tag, title in METRICS])
    now = time.time()
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=now - wall_s)
    for key in order:
        start.hparams[hparam_name(key)].CopyFrom(_value(values[key]))
    end = plugin_data_pb2.SessionEndInfo(status=STATUS.get(status, api_pb2.STATUS_UNKNOWN),
                                         end_time_secs=now)
    return [_summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
            _summary(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
            _summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end))]
