# The image the Helm chart runs: `docker build -t casb .`
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY casb ./casb
COPY addons ./addons
RUN pip install --no-cache-dir . && useradd --uid 10001 --no-create-home casb
USER 10001
EXPOSE 8080 8081
ENTRYPOINT ["casb"]
CMD ["run", "--config", "/etc/casb/casb.yaml"]
