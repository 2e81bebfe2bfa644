# One image for every service: `credits serve meter|settler|billing`. Configuration
# comes from the environment (see README).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY accounts accounts
COPY api api
COPY billing billing
COPY core core
COPY credits_sdk credits_sdk
COPY hotpath hotpath
COPY ledger ledger
COPY lua lua
COPY meter meter
COPY ops ops
COPY portal portal
COPY settler settler
COPY webhooks webhooks
RUN pip install --no-cache-dir . && useradd --system --uid 10001 credits
USER credits
EXPOSE 8080 8081
ENTRYPOINT ["credits"]
CMD ["serve", "meter"]
