"""Function vectors (Todd et al., ICLR 2024): a few attention heads carry the task of an in-context prompt."""

from lensflow.tasks.core.config import Config
from lensflow.tasks.core.experiment import Experiment, Headline
from lensflow.tasks.function_vectors.config import FunctionVectorsConf


def _check_inputs(conf: Config) -> None:
    from lensflow.tasks.function_vectors.patching import load_icl_tasks

    load_icl_tasks(conf.function_vectors)


EXPERIMENT = Experiment(
    name="function-vectors",
    flow="lensflow.flows.function_vectors:function_vectors_flow",
    headline=Headline("fv.layer_scan.zero_shot_fv.acc", "max", "best"),
    check_inputs=_check_inputs,
    section="function_vectors",
    config=FunctionVectorsConf,
    # headline: the per-layer curves (accuracy with the vector added at each layer, AIE and chosen heads per layer);
    # the run's scalars (means over ICL tasks, the layer, k): fv.details; fv.<ICL task>.<metric> (61 ICL tasks x 6)
    # falls through to fv.per_task (also one table, fv/per_task.json, and one heatmap)
    metric_sections=(("fv.transfer.", "fv.transfer"), ("fv.layer_scan.", "fv"), ("fv.layer_valid.", "fv"),
                     ("fv.aie.", "fv"), ("fv.heads.", "fv"), ("fv.mean.", "fv.details"), ("fv.layer", "fv.details"),
                     ("fv.top_k", "fv.details"), ("fv.tasks", "fv.details"), ("fv.", "fv.per_task")),
)
