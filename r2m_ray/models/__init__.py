"""r2m_ray.models."""
