"""The method's prompts and tags, verbatim from the paper (METHOD.md), and pure functions that fill
them. Below data/ and method/, so both import them downward.

The backward prompt is kept twice: `BACKWARD_INSTRUCTION` is the text inside the LLaMA-2 chat
markers, for a config chat template to wrap (ChatML etc.), and `BACKWARD_PROMPT` is that text
wrapped in `[INST] ... [/INST]` exactly as reported. The curation prompt carries no chat
markers; it is the user turn, wrapped by the chat template. Typos ("an user") are the paper's.
"""
from __future__ import annotations

from collections.abc import Sequence

# Tags ("system prompts") appended to instructions when seed and augmented data are mixed.
SEED_TAG = "Answer in the style of an AI Assistant."
WEB_TAG = "Answer with knowledge from web search."

# Between an instruction and its tags. The paper says only "appended"; the backward prompt the
# same group reports ends "{response}\n\nAnswer in the style of an AI Assistant.", so a blank
# line is the separator with evidence behind it. Tags among themselves are joined by a space.
TAG_SEPARATOR = "\n\n"

BACKWARD_INSTRUCTION = """\
Below is a candidate answer to a question or instruction from an user. Write the most likely question to which the text below would be a great answer.

{response}

Answer in the style of an AI Assistant."""

BACKWARD_PROMPT = "[INST] " + BACKWARD_INSTRUCTION + " [/INST]"

CURATION_PROMPT = """\
Below is an instruction from an user and a candidate answer. Evaluate whether or not the answer is a good example of how AI Assistant should respond to the user's instruction. Please assign a score using the following 5-point scale:
1: It means the answer is incomplete, vague, off-topic, controversial, or not exactly what the user asked for. For example, some content seems missing, numbered list does not start from the beginning, the opening sentence repeats user's question. Or the response is from another person's perspective with their personal experience (e.g. taken from blog posts), or looks like an answer from a forum. Or it contains promotional text, navigation text, or other irrelevant information.
2: It means the answer addresses most of the asks from the user. It does not directly address the user's question. For example, it only provides a high-level methodology instead of the exact solution to user's question.
3: It means the answer is helpful but not written by an AI Assistant. It addresses all the basic asks from the user. It is complete and self contained with the drawback that the response is not written from an AI assistant's perspective, but from other people's perspective. The content looks like an excerpt from a blog post, web page, or web search results. For example, it contains personal experience or opinion, mentions comments section, or share on social media, etc.
4: It means the answer is written from an AI assistant's perspective with a clear focus of addressing the instruction. It provide a complete, clear, and comprehensive response to user's question or instruction without missing or irrelevant information. It is well organized, self-contained, and written in a helpful tone. It has minor room for improvement, e.g. more concise and focused.
5: It means it is a perfect answer from an AI Assistant. It has a clear focus on being a helpful AI Assistant, where the response looks like intentionally written to address the user's question or instruction without any irrelevant sentences. The answer provides high quality content, demonstrating expert knowledge in the area, is very well written, logical, easy-to-follow, engaging and insightful.

Please first provide a brief reasoning you used to derive the rating score, and then write "Score: <rating>" in the last line.

{instruction}
{response}"""


def backward_instruction(response: str) -> str:
  """The backward model's user turn for `response`, without chat markers (for a chat template)."""
  return BACKWARD_INSTRUCTION.format(response=response)


def backward_prompt(response: str) -> str:
  """The full backward prompt for `response`, `[INST] ... [/INST]` included, as the paper reports it."""
  return BACKWARD_PROMPT.format(response=response)


def curation_prompt(instruction: str, response: str) -> str:
  """The self-curation (judge) prompt for one candidate pair; the chat template wraps it."""
  return CURATION_PROMPT.format(instruction=instruction, response=response)


def tagged_instruction(instruction: str, tags: Sequence[str], sep: str = TAG_SEPARATOR) -> str:
  """`instruction` with `tags` appended in order: trailing whitespace dropped, then `sep`, then the
  tags joined by single spaces. No tags: the instruction unchanged."""
  if isinstance(tags, str):
    raise TypeError("tags must be a sequence of strings, e.g. [SEED_TAG], not one string")
  if not tags:
    return instruction
  return instruction.rstrip() + sep + " ".join(tags)
