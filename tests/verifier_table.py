"""Answer / ground-truth pairs with the verdict a careful grader gives (shared by
tests/test_verifier_table.py). Each row: (verifier, completion, ground_truth, expected, why).

Where math-verify (our ``math``) and open-instruct's ``MathVerifier`` / ``GSM8KVerifier``
disagree, ``why`` starts with ``DISAGREE:`` and says which verdict the project follows.
"""

GSM8K = [
    # GSM8K's "####" answer, units and words after the number ignored
    ("gsm8k", "She pays 3 * 6 = 18.\n#### 18", "18", 1.0, "plain ####"),
    ("gsm8k", "#### 18 dollars", "18", 1.0, "words after #### are ignored"),
    ("gsm8k", "#### $18.00", "18", 1.0, "DISAGREE: open-instruct compares '18.00' with '18' as "
     "strings (0); the project compares exact rationals: 18.00 = 18"),
    ("gsm8k", "#### 1,234", "1234", 1.0, "thousands separator"),
    ("gsm8k", "The total is $1,234.50.", "1234.5", 1.0, "DISAGREE: open-instruct compares the "
     "strings '1234.50' and '1234.5' (0); the project compares values"),
    ("gsm8k", "#### 18\nCheck: 3 * 6 = 18, so 17 is wrong", "18", 1.0,
     "DISAGREE: open-instruct takes the last number (17: 0); the #### answer is the answer"),
    ("gsm8k", "So 5 apples + 3 = 8 apples.", "8", 1.0, "last number"),
    ("gsm8k", "the answer is 3, 5", "35", 0.0, "a list is not one number"),
    ("gsm8k", "#### 35", "3, 5", None, "ground truth error: not one number"),
    ("gsm8k", "#### 7", "Some steps.\n#### 7", 1.0, "DISAGREE: open-instruct compares with the "
     "whole solution text (0); the project reads the solution's #### answer"),
    ("gsm8k", "#### 8", ["7", "8"], 1.0, "a list of accepted answers"),
    ("gsm8k", "#### -4", "-4", 1.0, "negative"),
    ("gsm8k", "#### 4", "-4", 0.0, "sign matters"),
    ("gsm8k", "The answer is 0.5", "1/2", 1.0, "DISAGREE: open-instruct compares strings (0); "
     "exact rationals say 0.5 = 1/2"),
    ("gsm8k", "It costs \\boxed{42} dollars, not 40", "42", 1.0,
     "DISAGREE: open-instruct takes the last number (40: 0); a boxed answer is the answer"),
    ("gsm8k", "#### 42", 42, 1.0, "numeric ground truth"),
    ("gsm8k", "#### 42.0", "42", 1.0, "DISAGREE: open-instruct compares strings (0); 42.0 = 42"),
    ("gsm8k", "#### 41", "42", 0.0, "wrong"),
    ("gsm8k", "no number here", "3", 0.0, "no answer"),
    ("gsm8k", "It is 50%.", "50", 1.0, "a percentage answer to a GSM8K question"),
    ("gsm8k", "#### 1,000,000", "1000000", 1.0, "two separators"),
    ("gsm8k", "I had 12 pens, gave 4, so 8 remain", "8", 1.0, "commas between numbers"),
    ("gsm8k", "#### 12,5", "125", 0.0, "DISAGREE: open-instruct drops every comma between digits "
     "(1); 12,5 is not a thousands group, so not 125"),
]

MATH = [
    # \% and \$ (the old verifier kept the backslash)
    ("math", "So \\boxed{25\\%}", "25\\%", 1.0, "percentage"),
    ("math", "So \\boxed{25}", "25\\%", 1.0, "MATH graders accept the number of a percentage"),
    ("math", "So \\boxed{\\$18.90}", "\\$18.90", 1.0, "money"),
    ("math", "So \\boxed{18.90}", "\\$18.90", 1.0, "money without the sign"),
    # commas: lists and tuples are not numbers
    ("math", "\\boxed{3, 5}", "3, 5", 1.0, "a list"),
    ("math", "\\boxed{5, 3}", "3, 5", 1.0, "DISAGREE: open-instruct compares strings (0); a list "
     "of solutions is a set, math-verify's reading, which the project follows"),
    ("math", "\\boxed{35}", "3, 5", 0.0, "list vs number"),
    ("math", "\\boxed{3, 5}", "35", 0.0, "list vs number"),
    ("math", "\\boxed{1,000}", "1000", 1.0, "thousands separator"),
    ("math", "\\boxed{(1, 2)}", "(1,2)", 1.0, "a tuple / interval"),
    ("math", "\\boxed{(2, 1)}", "(1,2)", 0.0, "order matters"),
    ("math", "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)",
     1.0, "\\left( \\right)"),
    ("math", "\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0,
     "\\left( \\right) vs plain parentheses"),
    ("math", "\\boxed{[1, 2)}", "[1,2)", 1.0, "half-open interval"),
    ("math", "\\boxed{(1, 2)}", "[1,2)", 0.0, "interval ends matter"),
    ("math", "\\boxed{\\{1, 2\\}}", "\\{2, 1\\}", 1.0, "DISAGREE: open-instruct compares "
     "strings (0); sets are equal whatever their order"),
    ("math", "\\boxed{(-\\infty, 3]}", "(-\\infty,3]", 1.0, "infinite interval"),
    # fractions, roots, tfrac / dfrac
    ("math", "\\boxed{\\tfrac{1}{2}}", "\\frac{1}{2}", 1.0, "\\tfrac (the docs promised it)"),
    ("math", "\\boxed{\\dfrac{1}{2}}", "\\frac12", 1.0, "\\dfrac and \\frac12"),
    ("math", "\\boxed{\\frac12}", "\\frac{1}{2}", 1.0, "\\frac12"),
    ("math", "\\boxed{0.5}", "\\frac{1}{2}", 1.0, "decimal vs fraction"),
    ("math", "\\boxed{1/2}", "\\frac{1}{2}", 1.0, "slash fraction"),
    ("math", "\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1.0, "unreduced fraction is equal"),
    ("math", "\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0, "wrong fraction"),
    ("math", "\\boxed{\\sqrt2}", "\\sqrt{2}", 1.0, "\\sqrt2"),
    ("math", "\\boxed{\\sqrt{3}/2}", "\\frac{\\sqrt{3}}{2}", 1.0, "equivalent expressions"),
    ("math", "\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", 1.0, "\\sqrt3 in the truth"),
    ("math", "\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0, "simplified radical"),
    ("math", "\\boxed{\\sqrt{2}}", "\\sqrt{3}", 0.0, "wrong radical"),
    ("math", "\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", 1.0,
     "rationalized denominator"),
    # units, degrees, text, x = 5
    ("math", "\\boxed{12\\text{ cm}}", "12", 1.0, "\\text{ cm}"),
    ("math", "\\boxed{12 \\text{ square units}}", "12", 1.0, "words in \\text{}"),
    ("math", "\\boxed{30^\\circ}", "30", 1.0, "^\\circ"),
    ("math", "\\boxed{30}", "30^\\circ", 1.0, "^\\circ in the truth"),
    ("math", "\\boxed{x = 5}", "5", 1.0, "x = 5"),
    ("math", "\\boxed{5}", "x = 5", 1.0, "x = 5 in the truth"),
    ("math", "\\boxed{x = 6}", "5", 0.0, "wrong x ="),
    ("math", "\\boxed{\\text{(C)}}", "\\text{(C)}", 1.0, "multiple-choice letter"),
    ("math", "\\boxed{\\text{(B)}}", "\\text{(C)}", 0.0, "wrong letter"),
    # expressions
    ("math", "\\boxed{x^2+2x+1}", "(x+1)^2", 1.0, "expanded vs factored"),
    ("math", "\\boxed{2x+1}", "1+2x", 1.0, "commuted"),
    ("math", "\\boxed{2x-1}", "2x+1", 0.0, "different expression"),
    ("math", "\\boxed{\\pi}", "\\pi", 1.0, "constant"),
    ("math", "\\boxed{3.14}", "\\pi", 0.0, "an approximation is not pi"),
    ("math", "\\boxed{2\\pi}", "2 \\pi", 1.0, "spacing"),
    ("math", "\\boxed{-\\frac{1}{2}}", "-\\frac12", 1.0, "negative fraction"),
    ("math", "\\boxed{\\frac{-1}{2}}", "-\\frac{1}{2}", 1.0, "sign in numerator"),
    ("math", "\\boxed{10^{3}}", "1000", 1.0, "power"),
    ("math", "\\boxed{1+i}", "1+i", 1.0, "complex"),
    ("math", "\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}",
     "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", 1.0, "vector"),
    ("math", "\\boxed{\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}}",
     "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", 0.0, "wrong vector"),
    # extraction
    ("math", "First \\boxed{3}, on reflection \\boxed{4}", "4", 1.0, "the last boxed"),
    ("math", "First \\boxed{3}, on reflection \\boxed{4}", "3", 0.0, "not the first boxed"),
    ("math", "The final answer is $\\frac{3}{4}$.", "\\frac{3}{4}", 1.0, "anchored LaTeX"),
    ("math", "The answer is 8.", "8", 1.0, "DISAGREE: open-instruct finds no boxed / Minerva / "
     "$...$ answer and compares the whole text (0); math-verify reads the last number"),
    ("math", "#### 72", "72", 1.0, "DISAGREE: open-instruct does not read #### (0); the project "
     "reads GSM8K's marker on a MATH record too"),
    ("math", "I cannot solve it.", "3", 0.0, "no answer"),
    ("math", "\\boxed{}", "3", 0.0, "empty box"),
    ("math", "\\boxed{7}", ["7", "\\text{seven}"], 1.0, "list of accepted answers"),
    ("math", "\\boxed{7}", 7, 1.0, "numeric truth"),
    ("math", "\\boxed{8}", "7", 0.0, "wrong number"),
    ("math", "\\boxed{0.333333}", "\\frac{1}{3}", 0.0, "a decimal approximation is not the "
     "exact fraction"),
    ("math", "\\boxed{0.33}", "\\frac{1}{3}", 0.0, "two decimals is another number"),
    ("math", "\\boxed{\\infty}", "\\infty", 1.0, "infinity"),
    ("math", "\\boxed{x \\in [2, 5]}", "[2,5]", 1.0, "DISAGREE: open-instruct says 0 (strings "
     "differ); x in [2, 5] is the interval [2, 5], the project follows math-verify"),
]

ROWS = GSM8K + MATH
