"""One call's conversation: turn detection, the assistant's state machine and its replies."""
