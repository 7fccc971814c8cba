"""Causal tracing (Meng et al. 2022, ROME section 2): which hidden states carry a fact from subject to answer."""

from lensflow.tasks.causal_trace.config import CausalTraceConf
from lensflow.tasks.core.config import Config
from lensflow.tasks.core.experiment import Experiment, Headline


def _check_inputs(conf: Config) -> None:
    from lensflow.tasks.causal_trace.facts import load_facts

    load_facts(conf.causal_trace.facts_file)


EXPERIMENT = Experiment(
    name="causal-trace",
    flow="lensflow.flows.causal_trace:causal_trace_flow",
    headline=Headline("causal_trace.mlp.aie.last_subject_token", "max", "best"),
    check_inputs=_check_inputs,
    section="causal_trace",
    config=CausalTraceConf,
    # headline: each site's AIE per layer at the last subject token and the last token (the paper's two peaks); the
    # other token groups and the run's scalars: causal_trace.details
    metric_sections=(*((f"causal_trace.{site}.aie.{group}", "causal_trace") for site in ("resid", "mlp", "attn")
                       for group in ("last_subject_token", "last_token")), ("causal_trace.", "causal_trace.details")),
)
