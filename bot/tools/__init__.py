"""What runs beside the bot: the caller simulator and its scenarios, the benchmarks, doctor."""
