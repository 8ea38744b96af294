"""Verifier families: the verifiers researchers compare the paper's RM-7B with, each asked with its
published prompt (copied byte for byte from its official repository, cited below) and read the
paper's way, at one judgement token c:

    family     judgement tokens             c -> Eq. 3 (binary)      Eq. 4 (soft)
    rm         YES / NO                     1 if c = YES             p(YES) if c = YES, 1 - p(NO) if c = NO, else 0
    master-rm  YES / NO                     as rm                    as rm
    compass    A correct / B incorrect /    1 if c = A               p(A) / (p(A) + p(B) + p(C)) (renormalised over
               C invalid                                             its three judgements); c = C counts as invalid
    xverify    Correct / Incorrect          1 if c = Correct         as rm, with Correct / Incorrect
    cot        reasoning, then "Final       1 if c = " Yes"          as rm, where c is the token the verifier
               Decision: Yes/No"                                     generated right after "Final Decision:"

A one-token family (all but cot) is read at its first output token, as verifiers.py reads the paper's
verifier. cot generates first (greedy, or sampled with a seed per response), and Eq. 3 / Eq. 4 read
the token after its decision marker; its generated length is its cost and is logged. --cot_reward
compute_rm_score reads it as General-Reasoner's RL does instead (compute_rm_score, below). A c that is none
of a family's judgements is unjudged (reward 0), as for the paper's verifier. --soft_mode renorm
renormalises every family over its judgements; --soft_mode auto (the default) is each family's own
Eq. 4 (renormalised for compass: reward.family_soft_mode).

The numbers are reward.py's (judgement_rewards) and the prompt verifier_prompt.py's (VerifierPrompt); this
file is the table. A family is saved with a verifier's settings (verifier_prompt.VerifierSettings.family), so
a student distilled into a family's format (train_verifier.py sft --verifier_family) is asked the same
way. Imports no project file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    """How a family's verifier is asked and read. `settings`: the verifier_prompt.VerifierSettings fields in
    which it differs from the paper's (template, system prompt, judgement spellings, what of the
    response it reads)."""
    name: str
    settings: dict = field(default_factory=dict)
    invalid: str = ""           # a third judgement: the verifier says the answer cannot be graded (counted, reward 0)
    renormalise: bool = False   # Eq. 4 is p(positive) renormalised over the family's judgements
    chat: bool = True           # the prompt goes through the tokenizer's chat template (else it is sent as raw text)
    decision: str = ""          # generated families: the text after which the judgement token is read
    source: str = ""            # where its prompt comes from (repository, path, commit)


# ----------------------------------------------------------------------------------------------
# CompassVerifier (Liu et al. 2025, arXiv 2508.03686): github.com/open-compass/CompassVerifier,
# src/prompts.py at commit 2d7cba6df0b21f9c6121786ac1e5770c68473598 (git blob ba23005f). CV_PROMPT
# below is that file's literal, copied unchanged (its trailing spaces included); the official notebook
# (src/cv_eval.ipynb) fills it with str.format(question=, gold_answer=, llm_response=) and sends it as
# the only (user) message through the chat template, with the whole response, and reads "A" / "B" / "C".
CV_PROMPT = """
Please as a grading expert, judge whether the final answers given by the candidates below are consistent with the standard answers, that is, whether the candidates answered correctly. 
Here are some evaluation criteria:
1. Please refer to the given standard answer. You don't need to re-generate the answer to the question because the standard answer has been given. You only need to judge whether the candidate's answer is consistent with the standard answer according to the form of the question. THE STANDARD ANSWER IS ALWAYS CORRECT AND THE QUESTION IS PERFECTLY VALID. NEVER QUESTION THEM.
2. ONLY compare the FINAL ANSWER - COMPLETELY IGNORE any potential errors in the REASONING PROCESSES.
3. Some answers may be expressed in different ways, such as some answers may be a mathematical expression, some answers may be a textual description, as long as the meaning expressed is the same. Before making a judgment, please understand the question and the standard answer first, and then judge whether the candidate's answer is correct.
4. Some answers may consist of multiple items, such as multiple-choice questions, multiple-select questions, fill-in-the-blank questions, etc. Regardless of the question type, the final answer will be considered correct as long as it matches the standard answer, regardless of whether the reasoning process is correct. For multiple-select questions and multi-blank fill-in-the-blank questions, all corresponding options or blanks must be answered correctly and match the standard answer exactly to be deemed correct.
5. If the prediction is given with \\boxed{{}}, please ignore the \\boxed{{}} and only judge whether the candidate's answer is consistent with the standard answer.
6. If the candidate's answer is invalid (e.g., incomplete (cut off mid-response), lots of unnormal repetitive content, or irrelevant to the question, saying it can't answer the question because some irresistible factors, like ethical issues, no enough information, etc.), select option C (INVALID).Please judge whether the following answers are consistent with the standard answer based on the above criteria. Grade the predicted answer of this new question as one of:
A: CORRECT 
B: INCORRECT
C: INVALID
Just return the letters "A", "B", or "C", with no text around it.
Here is your task. Simply reply with either CORRECT, INCORRECT, or INVALID. Don't apologize or correct yourself if there was a mistake; we are just trying to grade the answer.
<Original Question Begin>:
{question}
<Original Question End>
<Standard Answer Begin>:
{gold_answer}
<Standard Answer End>
<Candidate's Answer Begin>: 
{llm_response}
<Candidate's Answer End>
Judging the correctness of the candidate's answer:
"""
COMPASS_TEMPLATE = CV_PROMPT.format(question="{question}", gold_answer="{reference}", llm_response="{response}")

# xVerify (Chen et al. 2025, arXiv 2504.10481): github.com/IAAR-Shanghai/xVerify,
# src/xVerify/prompts/judge_prompt.py at commit 5e3606ac82dfacde5120bbf6db295979bad10e1a (git blob
# 0b4e1ae6), the whole file below, unchanged. src/xVerify/eval.py fills it with str.format(question=,
# output=, answer=) (output: the whole response); src/xVerify/model.py sends it as the only user message
# (its API path; its local path pastes it into per-model chat strings), and eval.py reads the reply
# "Correct" / "Incorrect" (stripped, any case).
PROMPT = '''You are a diligent and precise assistant tasked with evaluating the correctness of responses. You will receive a question, an output sentence, and the correct answer. Your task is to determine if the output sentence accurately answers the question based on the provided correct answer. Respond with either [Correct] or [Incorrect].
-
Special considerations:

1. **Multiple Answers**: If the output contains multiple answers, evaluate whether later answers modify or correct earlier ones. In such cases, compare the final answer with the correct answer. If the final answer is unclear or incorrect, respond with [Incorrect].

2. **Mathematical Problems**: If the formats differ but the answers are mathematically equivalent, respond with [Correct].

3. **Explicit Options**: If the question provides explicit candidate answers, the output will be considered correct if it clearly indicates the correct option's code or the correct option's content.

4. **No Explicit Options**: If the question does not provide explicit options, the output must align with the correct answer in content and meaning to be considered [Correct].
-

Question: """{question}"""

Output sentence: """{output}"""

Correct answer: {answer}

Judgement:
'''
XVERIFY_TEMPLATE = PROMPT.format(question="{question}", output="{response}", answer="{reference}")

# General-Verifier (TIGER-Lab/general-verifier, the verifier of General-Reasoner, Ma et al. 2025, arXiv
# 2505.14652). Its own repository (github.com/TIGER-Lab/General-Verifier) could not be fetched here; the
# prompt is the one General-Reasoner's RL loop sends it: github.com/TIGER-AI-Lab/General-Reasoner,
# verifier.py lines 16-23 at commit 007e44cb1e6a624845616dd5c1c7e044e5bfd3cd (git blob 8154b8e2), copied
# unchanged. It is raw text ("User: ... Assistant:"), not a chat message: verifier.py hands the string to
# vLLM's generate (greedy, up to 2048 tokens) and passes an answer whose reply contains "Final Decision: Yes".
VERIFIER_PROMPT_TEMPLATE = (
    "User: ### Question: {question}\n\n"
    "### Ground Truth Answer: {ground_truth}\n\n"
    "### Student Answer: {student_answer}\n\n"
    "For the above question, please verify if the student's answer is equivalent to the ground truth answer.\n"
    "Do not solve the question by yourself; just check if the student's answer is equivalent to the ground truth answer.\n"
    "If the student's answer is correct, output \"Final Decision: Yes\". If the student's answer is incorrect, output \"Final Decision: No\". Assistant:"
)
COT_TEMPLATE = VERIFIER_PROMPT_TEMPLATE.format(question="{question}", ground_truth="{reference}",
                                               student_answer="{response}")

# General-Reasoner's reward (same file and commit, compute_rm_score and the extraction before it), what
# --cot_reward compute_rm_score gives: the verifier is asked about the policy's extracted final answer
# (extract_solution; "No Answer" when there is none), a reply containing VERIFIER_PASS_TAG anywhere passes,
# and the score is 1 for a pass, minus 0.05 per token of length difference between the answer and the
# reference (at most 10 tokens), minus 0.5 when no answer could be extracted. The regular expressions
# below are theirs, unchanged.
VERIFIER_PASS_TAG = "Final Decision: Yes"
NO_ANSWER = "No Answer"
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*)\}")
_FINAL_ANSWER = [r"Final Answer:\s*((?:[^<]|<[^<])*?)\n", r"Final Answer is:\s*((?:[^<]|<[^<])*?)\n",
                 r"The answer is:\s*((?:[^<]|<[^<])*?)\n", r"Answer:\s*((?:[^<]|<[^<])*?)\n",
                 r"Solution:\s*((?:[^<]|<[^<])*?)\n", r"The solution is:\s*((?:[^<]|<[^<])*?)\n"]


def extract_last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (two levels of nested braces), None when there is none."""
    matches = list(_BOXED.finditer(text))
    return matches[-1].group(1) if matches else None


def extract_last_final_answer(text: str) -> str | None:
    """The answer of the last "Final Answer:" (or "Answer:", "Solution:", ...) line, stripped, any case; a
    line needs its line break. None when no pattern matches."""
    last_match, last_position = None, -1
    for pattern in _FINAL_ANSWER:
        for match in re.finditer(pattern, text, flags=re.IGNORECASE):
            if match.start() > last_position:
                last_position, last_match = match.start(), match.group(1).strip()
    for stop_word in ("</s>", "<|im_end|>", "<|endoftext|>"):
        if last_match and last_match.endswith(stop_word):
            last_match = last_match[:-len(stop_word)].strip()
    return last_match


def extract_solution(text: str) -> str | None:
    """The policy's final answer as General-Reasoner reads it: the last non-empty \\boxed{}, else the last
    "Final Answer:" line; None when neither is there."""
    return extract_last_boxed(text) or extract_last_final_answer(text)


def passes(verification: str) -> bool:
    """General-Reasoner's decision: the verifier's reply contains "Final Decision: Yes" anywhere."""
    return VERIFIER_PASS_TAG in verification.strip()


def compute_rm_score(tokenizer, solution: str | None, reference: str, verification: str) -> float:
    """General-Reasoner's reward of one response: `solution` its extract_solution, `verification` the
    verifier's reply (special tokens dropped). The token counts are the verifier tokenizer's encode, as
    theirs (special tokens as its default adds them)."""
    score = -0.5 if solution is None else 0.0
    solution = solution or NO_ANSWER
    if passes(verification):
        score += 1.0
        difference = abs(len(tokenizer.encode(solution)) - len(tokenizer.encode(reference)))
        score -= min(difference, 10) * 0.05
    return score

FAMILIES = {f.name: f for f in (
    # The paper's RM-7B (virtuoussy/Qwen2.5-7B-Instruct-RLVR): verifier_prompt.TEMPLATE (docs/method.md), YES / NO.
    Family("rm", source="the paper (docs/method.md); verifier_prompt.TEMPLATE"),
    # Master-RM (Zhao et al. 2025, "One Token to Fool LLM-as-a-Judge", arXiv 2507.08794; sarosavo/Master-RM):
    # RM-7B's task retrained with "master key" negatives, asked in the same YES / NO form. Its model card
    # (huggingface.co/sarosavo/Master-RM) and its GitHub repository (Yulai-Zhao/Robust-Reward-Model) could
    # not be fetched here, so its prompt is NOT checked byte for byte: it is asked with the paper's template,
    # the form its model card describes. Check the card before relying on Master-RM's exact bytes.
    Family("master-rm", source="the paper's template (Master-RM's own card could not be fetched to check it)"),
    # compass and xverify read the raw output, <think> blocks included, as their code sends it (issue 32)
    Family("compass", dict(template=COMPASS_TEMPLATE, system_prompt="", positive="A", negative="B",
                           full_response=True, strip_think=False),
           invalid="C", renormalise=True, source="open-compass/CompassVerifier@2d7cba6 src/prompts.py CV_PROMPT"),
    Family("xverify", dict(template=XVERIFY_TEMPLATE, system_prompt="", positive="Correct", negative="Incorrect",
                           full_response=True, strip_think=False),
           source="IAAR-Shanghai/xVerify@5e3606a src/xVerify/prompts/judge_prompt.py PROMPT"),
    # The decision token is " Yes" / " No" with its space: the verifier writes "Final Decision: Yes".
    Family("cot", dict(template=COT_TEMPLATE, system_prompt="", positive=" Yes", negative=" No"),
           chat=False, decision="Final Decision:",
           source="TIGER-AI-Lab/General-Reasoner@007e44c verifier.py VERIFIER_PROMPT_TEMPLATE"),
)}


def family(name: str) -> Family:
    """The family called `name`; a ValueError listing the valid names otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown verifier family {name!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def decision_position(tokenizer, generated: list[int], marker: str) -> int | None:
    """The index in `generated` of the token right after the last `marker` in its text, or None when
    the marker is absent, ends inside a token, or nothing follows it (the verifier gave no decision).
    The marker is found in the decoded text, not by token ids: it tokenises differently in context."""
    text = tokenizer.decode(generated, skip_special_tokens=True)
    start = text.rfind(marker)
    if start < 0:
        return None
    end = start + len(marker)
    lo, hi = 0, len(generated)  # the shortest prefix whose text reaches the marker's end
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(generated[:mid], skip_special_tokens=True)) >= end:
            hi = mid
        else:
            lo = mid + 1
    if lo >= len(generated) or tokenizer.decode(generated[:lo], skip_special_tokens=True) != text[:end]:
        return None
    return lo
