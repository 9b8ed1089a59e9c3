// node-postgres (npm `pg`, COPY through `pg-copy-streams`): the client-matrix workload.
// See tests/src/clients.rs.
//
// `pg` reads PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE itself. Its own reading
// of PGSSLMODE turns `prefer` into verified TLS, so `ssl` is always set here, from
// libpq's variables: node-postgres has no opportunistic TLS, and its default (no
// PGSSLMODE) is plain text.
'use strict'

const fs = require('fs')
const { Readable } = require('stream')
const { pipeline } = require('stream/promises')
const { Client } = require('pg')
const { from: copyFrom, to: copyTo } = require('pg-copy-streams')

const ROWS = 100000 // about 10.7 MB of COPY text
const PAYLOAD = 'x'.repeat(100)
const CANCEL_AFTER_MS = 1000
const CANCEL_WITHIN_MS = 10000

function sslConfig() {
  const mode = process.env.PGSSLMODE
  const root = process.env.PGSSLROOTCERT
  const ca = root ? fs.readFileSync(root) : undefined
  switch (mode) {
    case undefined:
    case 'disable':
    case 'allow':
    case 'prefer':
      return false
    case 'require':
      return ca ? { ca, checkServerIdentity: () => undefined } : { rejectUnauthorized: false }
    case 'verify-ca':
      return { ca, checkServerIdentity: () => undefined }
    case 'verify-full':
      return { ca }
    default:
      throw new Error(`unknown PGSSLMODE ${mode}`)
  }
}

function config() {
  return {
    ssl: sslConfig(),
    enableChannelBinding: process.env.PGCHANNELBINDING === 'require',
    connectionTimeoutMillis: 60000,
  }
}

function report(name, detail) {
  console.log(`ok ${name} ${detail || ''}`.trimEnd())
}

async function scalar(client, text, values) {
  const r = await client.query({ text, values, rowMode: 'array' })
  return r.rows[0][0]
}

function assert(cond, what) {
  if (!cond) throw new Error(`assertion failed: ${what}`)
}

async function workload() {
  let step = 'connect'
  try {
    const client = new Client(config())
    await client.connect()
    report(step, `user=${await scalar(client, 'select current_user')}`)

    step = 'prepared'
    const got = []
    for (const n of [21, 50]) {
      const r = await client.query({ name: 'twice', text: 'select $1::int * 2 as v', values: [n] })
      got.push(r.rows[0].v)
    }
    assert(got.join() === '42,100', got)
    report(step, 'results=42,100')

    step = 'transaction'
    await client.query('create temp table tx (n int)')
    await client.query('begin')
    await client.query('insert into tx values (1)')
    await client.query('rollback')
    assert((await scalar(client, 'select count(*)::int from tx')) === 0, 'rolled back')
    await client.query('begin')
    await client.query('insert into tx values (2)')
    await client.query('commit')
    assert((await scalar(client, 'select count(*)::int from tx')) === 1, 'committed')
    report(step, 'rollback=0 commit=1')

    step = 'copy_in'
    const lines = []
    for (let i = 0; i < ROWS; i++) lines.push(`${i}\t${PAYLOAD}\n`)
    const data = Buffer.from(lines.join(''))
    await client.query('create temp table big (id int, payload text)')
    const ingest = client.query(copyFrom('copy big from stdin'))
    // 64 KiB chunks, as a file stream would send them.
    const chunks = []
    for (let o = 0; o < data.length; o += 65536) chunks.push(data.subarray(o, o + 65536))
    await pipeline(Readable.from(chunks), ingest)
    assert(ingest.rowCount === ROWS, `rowCount ${ingest.rowCount}`)
    assert((await scalar(client, 'select count(*)::int from big')) === ROWS, 'count')
    report(step, `rows=${ingest.rowCount} bytes=${data.length}`)

    step = 'copy_out'
    const out = []
    const egress = client.query(copyTo('copy (select * from big order by id) to stdout'))
    for await (const chunk of egress) out.push(chunk)
    const back = Buffer.concat(out)
    assert(back.equals(data), `copied out ${back.length} bytes, ${data.length} in`)
    report(step, `rows=${egress.rowCount} bytes=${back.length}`)

    step = 'error'
    let code
    try {
      await client.query('select 1/0')
    } catch (e) {
      code = e.code
    }
    assert(code === '22012', `sqlstate ${code}`)
    assert((await scalar(client, 'select 2')) === 2, 'then')
    report(step, `sqlstate=${code} then=2`)

    step = 'cancel'
    // node-postgres' CancelRequest: Client.prototype.cancel(client, query) on a new
    // Client with the same settings (it prints a deprecation notice for activeQuery).
    const start = Date.now()
    const sleeping = client.query('select pg_sleep(30)')
    const timer = setTimeout(() => {
      new Client(config()).cancel(client, client._getActiveQuery())
    }, CANCEL_AFTER_MS)
    code = undefined
    try {
      await sleeping
    } catch (e) {
      code = e.code
    } finally {
      clearTimeout(timer)
    }
    const took = Date.now() - start
    assert(code === '57014', `sqlstate ${code} after ${took} ms`)
    assert(took < CANCEL_AFTER_MS + CANCEL_WITHIN_MS, `cancel took ${took} ms`)
    assert((await scalar(client, 'select 3')) === 3, 'usable after cancel')
    report(step, `sqlstate=${code} seconds=${(took / 1000).toFixed(2)}`)

    step = 'close'
    await client.end()
    report(step)
  } catch (e) {
    console.log(`FAIL ${step}: ${e && e.stack ? e.stack.split('\n')[0] : e}`)
    process.exit(1)
  }
}

async function bench(n) {
  for (let i = 0; i < n; i++) {
    const t0 = process.hrtime.bigint()
    const client = new Client(config())
    await client.connect()
    assert((await scalar(client, 'select 1')) === 1, 'select 1')
    const t1 = process.hrtime.bigint()
    await client.end()
    const t2 = process.hrtime.bigint()
    const ms = (a, b) => (Number(b - a) / 1e6).toFixed(3)
    console.log(`bench connect_ms=${ms(t0, t2)} close_ms=${ms(t1, t2)}`)
  }
}

const n = process.env.CLIENT_BENCH
;(n ? bench(Number(n)) : workload()).catch((e) => {
  console.log(`FAIL ${e}`)
  process.exit(1)
})
