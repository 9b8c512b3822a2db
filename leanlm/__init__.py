"""leanlm: a lean LLM inference engine and efficiency lab."""
from leanlm.engine.engine import LLM, LLMEngine
from leanlm.engine.outputs import CompletionOutput, Logprob, RequestOutput
from leanlm.engine.sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
