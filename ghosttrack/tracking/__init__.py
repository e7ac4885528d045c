"""Feature tracks across layers and hallucination detection on TruthfulQA. Imports interpret and below."""
