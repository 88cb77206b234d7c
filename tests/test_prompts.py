"""The method's prompts: verbatim wording (typos included) and filling that never re-reads braces."""
import pytest

from humpback_jax import prompts


def test_backward_prompt_is_the_instruction_inside_llama2_markers():
  assert prompts.BACKWARD_PROMPT == f"[INST] {prompts.BACKWARD_INSTRUCTION} [/INST]"
  assert prompts.backward_prompt("y") == f"[INST] {prompts.backward_instruction('y')} [/INST]"


def test_backward_instruction_puts_the_response_between_the_task_and_the_seed_tag():
  assert prompts.backward_instruction("The answer.") == (
      "Below is a candidate answer to a question or instruction from an user. Write the most likely "
      "question to which the text below would be a great answer.\n\nThe answer.\n\n"
      "Answer in the style of an AI Assistant.")


def test_curation_prompt_keeps_the_papers_wording_and_ends_with_the_pair():
  text = prompts.curation_prompt("Name a prime.", "7")
  assert text.startswith("Below is an instruction from an user and a candidate answer.")
  assert "It provide a complete, clear, and comprehensive response" in text  # the paper's typo
  assert text.endswith('then write "Score: <rating>" in the last line.\n\nName a prime.\n7')


def test_braces_in_the_data_are_kept_literally():
  assert prompts.curation_prompt("Fill {response} in", "{instruction} {}").endswith(
      "Fill {response} in\n{instruction} {}")
  assert "{x}" in prompts.backward_prompt("{x}")


def test_tags_follow_the_instruction_after_a_blank_line_seed_tag_first():
  both = prompts.tagged_instruction("Name a prime.\n", [prompts.SEED_TAG, prompts.WEB_TAG])
  assert both == ("Name a prime.\n\nAnswer in the style of an AI Assistant. "
                  "Answer with knowledge from web search.")


def test_no_tags_leave_the_instruction_unchanged():
  assert prompts.tagged_instruction("Name a prime.\n", []) == "Name a prime.\n"


def test_a_single_string_is_refused_as_tags():
  with pytest.raises(TypeError, match="sequence of strings"):
    prompts.tagged_instruction("Name a prime.", prompts.SEED_TAG)
