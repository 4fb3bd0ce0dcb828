"""r2m_ray.actors."""
