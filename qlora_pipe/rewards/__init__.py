"""GRPO's rewards, below the stages that use them (data checks their columns, training calls them, evaluate
scores held-out answers with them).

    builtin.py       the built-in rewards (format, exact match, F1, tool calls) on completion text
    functions.py     a recipe's rewards as TRL reward functions: built in or the user's, guarded and logged
    user_rewards.py  the user's reward module: found, imported and checked against the data's columns
    user_code.py     running the user's code: what it raised, where, and Ctrl-C
    tool_calls.py    the tool-call grammar the tool rewards and chat read from generated text
"""
