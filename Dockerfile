# One image for every service: `credits serve meter` (and, as they land, the billing
# service and the settler). Configuration comes from the environment (see README).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY core core
COPY ledger ledger
COPY lua lua
COPY meter meter
COPY ops ops
COPY settler settler
RUN pip install --no-cache-dir . && useradd --system --uid 10001 credits
USER credits
EXPOSE 8080
ENTRYPOINT ["credits"]
CMD ["serve", "meter"]
