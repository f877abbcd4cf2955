from .schedule import NoiseSchedule
