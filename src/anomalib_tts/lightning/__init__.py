"""The Lightning door: the callback that refines in anomalib's loops, where it sits, the factory, the mask writer.

Nothing is imported here, so that Lightning's callback factory (``anomalib_tts.lightning.factory``) imports no
more than itself when ``ANOMALIB_TTS_CONFIG`` is unset.
"""
